"""imdswatch against the three anchors on the labelled scenario, side by side.

    python -m bench.evaluate [--seed 7] [--scale 1.0] [--out DIR] [--details]

Honesty rules. The trace given to imdswatch and the anchors is written WITHOUT the
labels; labels are kept in memory, indexed by line, and joined back only to count.
imdswatch runs through its real replay path (`imdswatch.replay.replay` on the gzip
file, `scoring.scorer.Scorer` with default `ScorerSettings`); its alerts are mapped
back to lines by `event.id`, which is a sequence number and says nothing about truth.

Definitions (all systems are counted the same way):
* An alert "covers" the events an analyst would see in it: imdswatch and Falco alert
  on one event; an Elastic anomaly record covers every event of its process name in its
  15-minute bucket; a new_terms alert covers its (host, executable) events in its run.
* Alerts raised before the end of imdswatch's learning period (counted from the first
  event) are dropped for every system, so no one is charged for a cold start.
* recall = attack actors with at least one covered event / attack actors.
* entity = (host.name, process.name, user.name). FP entities = distinct entities of
  covered BENIGN events; TP entities = distinct entities of covered ATTACK events.
  precision = TP / (TP + FP); F1 = 2PR / (P + R) with R the actor recall.
* latency of an actor = time its first alert reaches an analyst − time of its first
  event (Elastic's bucket close, query delay and rule schedule included; see anchors).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from bench.anchors import ANCHORS, Detection
from bench.scenario import Scenario, generate
from intake.parser import MalformedEvent, event_from_ecs


@dataclass
class Labels:
    """Truth per line of the unlabelled trace."""

    attack: list[bool]
    actor: list[str]
    entity: list[tuple[str, str, str]]


@dataclass
class Result:
    system: str
    actors_total: int
    detected: dict[str, float] = field(default_factory=dict)  # actor -> latency (s)
    tp_entities: set = field(default_factory=set)
    fp_entities: Counter = field(default_factory=Counter)  # entity -> benign events covered
    fp_by_source: dict = field(default_factory=lambda: defaultdict(set))  # actor -> entities
    benign_alerts: int = 0
    attack_alerts: int = 0
    seconds: float = 0.0
    notes: str = ""

    @property
    def recall(self) -> float:
        return len(self.detected) / self.actors_total if self.actors_total else 0.0

    @property
    def precision(self) -> float:
        tp, fp = len(self.tp_entities), len(self.fp_entities)
        return tp / (tp + fp) if tp + fp else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def recall_interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Clopper-Pearson interval of the recall: a few dozen actors are a small sample, and the
        interval says how far apart two systems' recalls must be to mean anything."""
        from scipy.stats import beta

        k, n = len(self.detected), self.actors_total
        if not n:
            return 0.0, 1.0
        a = (1 - confidence) / 2
        lo = float(beta.ppf(a, k, n - k + 1)) if k else 0.0
        hi = float(beta.ppf(1 - a, k + 1, n - k)) if k < n else 1.0
        return lo, hi

    def latency(self, how: str) -> float | None:
        lat = list(self.detected.values())
        if not lat:
            return None
        return statistics.median(lat) if how == "median" else max(lat)


def labels_of(sc: Scenario) -> Labels:
    tr = sc.trace
    attack, actor, entity = [], [], []
    for i in tr.order():
        doc = tr.shape_docs[tr.refs[i]]
        lab = doc["labels"]
        attack.append(lab["imdswatch_truth"] == "attack")
        actor.append(lab["imdswatch_actor"])
        entity.append((doc["host"]["name"], doc["process"]["name"], doc["user"]["name"]))
    return Labels(attack, actor, entity)


def score(system: str, detections: list[tuple[float, int, object]], labels: Labels,
          sc: Scenario, not_before: float) -> Result:
    """Count one system's detections (alert time, line, alert key) against the truth."""
    first = {a.id: a.first_ts for a in sc.actors}
    res = Result(system, len(sc.actors))
    benign_keys, attack_keys = set(), set()
    for alert_ts, n, key in detections:
        if alert_ts < not_before:
            continue
        if labels.attack[n]:
            aid = labels.actor[n]
            lat = max(0.0, alert_ts - first[aid])
            if aid not in res.detected or lat < res.detected[aid]:
                res.detected[aid] = lat
            res.tp_entities.add(labels.entity[n])
            attack_keys.add(key)
        else:
            res.fp_entities[labels.entity[n]] += 1
            res.fp_by_source[labels.actor[n]].add(labels.entity[n])
            benign_keys.add(key)
    res.benign_alerts, res.attack_alerts = len(benign_keys), len(attack_keys)
    return res


def read_events(path: Path):  # noqa: ANN201 - iterator of (line index, Event)
    from intake.ndjson import numbered_lines

    for lineno, line in numbered_lines(str(path)):
        try:
            yield lineno - 1, event_from_ecs(orjson.loads(line))
        except (orjson.JSONDecodeError, MalformedEvent):
            continue


def run_anchors(path: Path, labels: Labels, sc: Scenario, not_before: float) -> list[Result]:
    anchors = [cls() for cls in ANCHORS]
    t = time.perf_counter()
    for n, ev in read_events(path):
        for a in anchors:
            a.observe(n, ev)
    elapsed = time.perf_counter() - t
    out = []
    for a in anchors:
        dets: list[Detection] = a.finish()
        r = score(a.name, [(d.alert_ts, d.n, d.key) for d in dets], labels, sc, not_before)
        r.seconds = elapsed
        out.append(r)
    return out


@dataclass
class ImdswatchRun:
    result: Result
    # (line, detector, score, reason, time, severity)
    alerts: list[tuple[int, str, float, str, float, str]]
    learning_period: float
    model_size: dict[str, int]
    not_before: float  # alerts before it are not counted (the learning period)


def run_imdswatch(path: Path, labels: Labels, sc: Scenario, learning_period: float | None,
                  count_learning: bool = False) -> ImdswatchRun:
    from imdswatch.replay import replay
    from scoring.endpoints import SENSITIVE_CLASSES
    from scoring.scorer import Scorer
    from scoring.settings import ScorerSettings

    settings = ScorerSettings()
    if learning_period is not None:
        settings.learning_period = learning_period
    scorer = Scorer(settings)
    alerts: list[tuple[int, str, float, str, float, str]] = []
    dets: list[tuple[float, int, object]] = []

    bursts: dict[str, int] = {}  # host -> line of its open burst's alert

    def on_outcome(out) -> None:  # noqa: ANN001 - scoring.scorer.Outcome
        if out.alert:
            n = int(out.event.event_id.rsplit("-", 1)[1])
            alerts.append((n, out.detector, out.score, out.reason, out.event.ts, out.severity))
            dets.append((out.event.ts, n, ("imdswatch", n)))
            if out.burst:
                bursts[out.event.host or ""] = n
        elif (out.suppressed and out.burst and (out.event.host or "") in bursts
              and out.request_class not in SENSITIVE_CLASSES):
            # A burst of new callers is one alert naming the burst; the callers folded
            # into it are covered by it, as an anomaly record covers its bucket's events.
            # A credential, token or identity request folded away is not: the burst's
            # alert never names it (a spray hiding the theft that follows).
            n = int(out.event.event_id.rsplit("-", 1)[1])
            dets.append((out.event.ts, n, ("imdswatch", bursts[out.event.host or ""])))

    t = time.perf_counter()
    replay(str(path), scorer, on_outcome, on_malformed=lambda *_: None)
    not_before = sc.start if count_learning else sc.start + settings.learning_period
    res = score("imdswatch", dets, labels, sc, not_before)
    res.seconds = time.perf_counter() - t
    return ImdswatchRun(res, alerts, settings.learning_period, scorer.model_size(), not_before)


def fmt_latency(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return "0 s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def table(results: list[Result]) -> str:
    head = ("system", "recall", "recall 95% CI", "FP entities", "benign alerts", "precision",
            "F1", "latency median", "latency max")
    rows = [head]
    for r in results:
        lo, hi = r.recall_interval()
        rows.append((r.system, f"{len(r.detected)}/{r.actors_total} ({r.recall:.0%})",
                     f"{lo:.2f}-{hi:.2f}",
                     str(len(r.fp_entities)), str(r.benign_alerts), f"{r.precision:.2f}",
                     f"{r.f1:.2f}", fmt_latency(r.latency("median")),
                     fmt_latency(r.latency("max"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths, strict=True))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def actor_matrix(sc: Scenario, results: list[Result]) -> str:
    short = ["imdswatch" if r.system == "imdswatch" else r.system.split()[0] + "/" +
             r.system.split()[1] for r in results]
    rows = [("actor", "kind", *short)]
    for a in sc.actors:
        rows.append((a.id, a.kind, *(fmt_latency(r.detected.get(a.id)) if a.id in r.detected
                                     else "MISS" for r in results)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                     for row in rows)


@dataclass
class Evaluation:
    results: list[Result]
    imdswatch: ImdswatchRun
    scenario: Scenario
    labels: Labels


def evaluate(seed: int = 7, scale: float = 1.0, out_dir: Path | None = None,
             learning_period: float | None = None) -> Evaluation:
    sc = generate(seed, scale)
    labels = labels_of(sc)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        path = Path(tmp) / "scenario-unlabelled.ndjson.gz"
        sc.write(path, labels=False)
        run = run_imdswatch(path, labels, sc, learning_period)
        results = [run.result, *run_anchors(path, labels, sc, run.not_before)]
    return Evaluation(results, run, sc, labels)


def evaluate_small(sc: Scenario, count_learning: bool, out_dir: Path | None = None
                   ) -> Evaluation:
    """One of bench.small_scenarios, every system on it; with `count_learning`, alerts
    during imdswatch's learning period count for every system (a fresh node's first hour
    is all learning period)."""
    labels = labels_of(sc)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        path = Path(tmp) / "small-unlabelled.ndjson.gz"
        sc.write(path, labels=False)
        run = run_imdswatch(path, labels, sc, None, count_learning)
        results = [run.result, *run_anchors(path, labels, sc, run.not_before)]
    return Evaluation(results, run, sc, labels)


def details(ev: Evaluation, sources: int = 25) -> str:
    """What the lead needs to improve the scorer: imdswatch's false-positive entities, the
    same set the table counts (benign events covered after the learning period), by benign
    source, each with the first alert that covers one of them; then the actors it missed."""
    run = ev.imdswatch
    res = run.result
    first: dict[tuple, tuple[str, float, str]] = {}
    for n, det, s, reason, ts, _ in run.alerts:
        if ts >= run.not_before and not ev.labels.attack[n]:
            first.setdefault(ev.labels.entity[n], (det, s, reason))
    out = [f"imdswatch false-positive entities ({len(res.fp_entities)}, as counted in the "
           "table), by benign source (an entity may come from more than one):"]
    by_source = sorted(res.fp_by_source.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    for actor, ents in by_source[:sources]:
        alerted = sorted(e for e in ents if e in first)
        if alerted:
            det, s, reason = first[alerted[0]]
            example = f"e.g. {alerted[0]} {det} {s:.0f}: {reason}"
        else:
            example = "covered only by a burst's alert"
        many = "entity" if len(ents) == 1 else "entities"
        out.append(f"  {actor.removeprefix('benign/')}: {len(ents)} {many}, {example}")
    if len(by_source) > sources:
        out.append(f"  ... and {len(by_source) - sources} more sources")
    for r in ev.results:
        if r.system != "imdswatch":
            top = sorted(r.fp_by_source.items(), key=lambda kv: -len(kv[1]))[:6]
            out.append(f"{r.system}: FP entities by benign source: "
                       + ", ".join(f"{a.removeprefix('benign/')} {len(e)}" for a, e in top))
    missed = [a for a in ev.scenario.actors if a.id not in res.detected]
    out.append(f"imdswatch missed actors ({len(missed)}):")
    for a in missed:
        out.append(f"  {a.id} ({a.kind}): {a.description}")
    return "\n".join(out)


@dataclass
class SeedRun:
    """One seed's evaluation, small enough to come back from a worker process."""

    seed: int
    events: int
    hosts: int
    results: list[Result]
    text: str  # the evaluation's report (tables, per-actor latency, details)

    @property
    def mine(self) -> Result:
        return self.results[0]

    @property
    def anchors(self) -> list[Result]:
        return self.results[1:]


def run_seed(seed: int, scale: float, with_details: bool) -> SeedRun:
    ev = evaluate(seed, scale)
    for r in ev.results:
        r.fp_by_source = dict(r.fp_by_source)  # a defaultdict's factory does not pickle
    return SeedRun(seed, len(ev.scenario.trace), len(ev.scenario.fleet.hosts), ev.results,
                   report(ev, with_details))


def over_seeds(seeds: tuple[int, ...], scale: float = 1.0, workers: int = 2) -> list[SeedRun]:
    """Every seed's evaluation, `workers` at a time (each is one process: quality figures do
    not depend on what else runs), in the order given; details for the first seed."""
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(run_seed, seeds, [scale] * len(seeds),
                             [i == 0 for i in range(len(seeds))]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="imdswatch vs anchors on the labelled scenario")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=None, help="directory for the temporary trace")
    ap.add_argument("--details", action="store_true")
    args = ap.parse_args(argv)
    ev = evaluate(args.seed, args.scale, args.out)
    print(report(ev, args.details))
    return 0


def report(ev: Evaluation, with_details: bool = True) -> str:
    sc = ev.scenario
    lp = ev.imdswatch.learning_period
    head = (f"scenario: seed {sc.seed}, scale {sc.scale}, {len(sc.trace)} events, "
            f"{len(sc.fleet.hosts)} hosts, {len(sc.actors)} attack actors; "
            f"imdswatch learning period {fmt_latency(lp)} (ScorerSettings default), "
            "applied to every system")
    parts = [head, table(ev.results), "", "detection latency per actor (MISS = not detected):",
             actor_matrix(sc, ev.results)]
    if with_details:
        parts += ["", details(ev)]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
