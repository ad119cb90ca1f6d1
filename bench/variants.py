# Metadata addresses in this file are data (event fields): nothing here connects anywhere.
"""Variants of the labelled fleet scenario (bench/scenario.py) for what a fleet does that
the base scenario shows only once (issue 20):

* rollouts: in week two, a new log shipper DaemonSet reaches every node over about a day
  (a rolling update: one node every 20-60 minutes); a company agent is upgraded on every
  node over six hours (its versioned install directory changes, /opt/acme/agent/2.4.1 to
  2.5.0); a host metrics agent moves from python3.11 to python3.12 with a new node image,
  node by node over a day. In the middle of each, an attacker's one-off from an unusual
  path under the same name (labelled attacks: they must still be caught).
* identity lost: a quarter of the short-lived benign callers' events (cron and boot-time
  tools, operators' CLIs) lack executable, parent and command line, as exports from tools
  that lose the race with /proc do.

Both start from `bench.scenario.generate(seed, scale)` and only add or alter events, so the
base scenario's figures stay comparable.
"""

from __future__ import annotations

import random

from bench import http_requests as R
from bench.attacks import Actor
from bench.ecs import Host, Proc
from bench.fleet import DAY, HOUR, SHIM, SYSTEMD, emit_requests
from bench.scenario import Scenario, generate
from bench.timing import pair, periodic

IMDS = ("169.254.169.254", 80)
MINUTE = 60.0
BASH = ("bash", "/usr/bin/bash")

# The benign sources these variants add (their false positives are counted per source).
ROLLOUT_SOURCES = ("benign/rollout-vector", "benign/upgrade-acme-agent",
                   "benign/upgrade-host-metrics")
# Short-lived benign callers: a process that calls and exits (boot, cron, a CLI run).
SHORT_LIVED = ("benign/cloud-init", "benign/user-data-curl", "benign/gke-configure-curl",
               "benign/gce-startup", "benign/inventory", "benign/yum-amazon-id",
               "benign/backup-cli", "benign/operator-aws-cli", "benign/ecr-credential-provider",
               "benign/nodeadm")
LOST_SHARE = 0.25


def _reqs(cloud: str, ua: str) -> tuple:
    if cloud == "aws":
        return R.v2(ua, "/latest/meta-data/instance-id", "/latest/meta-data/placement/region")
    if cloud == "gcp":
        return R.gcp(ua, "instance/id", "instance/zone")
    return R.azure(ua, "instance/compute")


def _emit(sc: Scenario, h: Host, proc: Proc, times: list[float], actor: str, ua: str,
          pod=None, truth: str = "benign", reqs: tuple | None = None) -> None:  # noqa: ANN001
    if not times:
        return
    reqs = reqs or _reqs(h.cloud, ua)
    emit_requests(sc.trace, h, proc, IMDS, pair(times) if h.cloud == "aws" else times, truth,
                  actor, pod, reqs, "tcp", (sc.start, sc.end))


def _up(sc: Scenario, h: Host) -> float:
    return max(sc.start, h.join_ts + 90.0)


def _attack(sc: Scenario, aid: str, desc: str, h: Host, proc: Proc, t: float) -> None:
    creds = R.AWS_ROLE + R.NODE_ROLE
    _emit(sc, h, proc, [t], aid, "curl/7.88.1", truth="attack",
          reqs=R.v2("curl/7.88.1", creds))
    n = 2  # the token request and the credential request
    sc.actors.append(Actor(aid, "rollout_one_off", desc, h.name, t, t + 0.004, n))


def with_rollouts(sc: Scenario) -> Scenario:
    """`sc` with the rollouts and the upgrades, and an attacker's one-off inside each."""
    rng = random.Random(sc.seed * 7919 + 20)
    fleet = sc.fleet
    hosts = [h for h in fleet.hosts if _up(sc, h) < sc.start + 9 * DAY]
    aws = [h for h in hosts if h.cloud == "aws"]

    def pid() -> int:
        return rng.randrange(1000, 4_000_000)

    # A new DaemonSet: one node every 20-60 minutes from day 9, 08:00.
    t = sc.start + 9 * DAY + 8 * HOUR
    order = hosts[:]
    rng.shuffle(order)
    arrivals = {}
    for h in order:
        arrivals[h.name] = t
        pod = fleet.kube_pod(h, "observability", "vector", "timberio/vector:0.38.0-debian", t)
        proc = Proc("vector", "/usr/bin/vector", "root", "0", SHIM[0], SHIM[1],
                    "/usr/bin/vector --config-dir /etc/vector/", pid(), pid())
        _emit(sc, h, proc, [t + 2.0, *periodic(rng, t, sc.end, 1800)], "benign/rollout-vector",
              "Vector/0.38.0", pod)
        t += rng.uniform(20, 60) * MINUTE
    mid = sorted(arrivals.values())[len(arrivals) // 2]
    h = rng.choice([x for x in aws if arrivals[x.name] < mid])
    _attack(sc, "rollout-one-off-vector", "a copy named vector in /tmp, run from a shell in "
            "the middle of the vector DaemonSet's rollout, fetches the role's credentials",
            h, Proc("vector", "/tmp/.v/vector", "root", "0", *BASH, "/tmp/.v/vector", pid(),
                    pid()), mid + 5 * MINUTE)

    # A company agent on every node, upgraded node by node over six hours from day 10.
    up_at = sc.start + 10 * DAY + 9 * HOUR
    upgraded = {}
    for h in hosts:
        upgraded[h.name] = u = up_at + rng.uniform(0, 6 * HOUR)
        for version, lo, hi in (("2.4.1", _up(sc, h), u), ("2.5.0", u + 30.0, sc.end)):
            exe = f"/opt/acme/agent/{version}/bin/acme-agent"
            proc = Proc("acme-agent", exe, "root", "0", *SYSTEMD, f"{exe} --daemon", pid(), 1)
            _emit(sc, h, proc, periodic(rng, lo, hi, 900), "benign/upgrade-acme-agent",
                  f"acme-agent/{version}")
    h = rng.choice(aws)
    exe = "/var/tmp/.acme/2.5.0/bin/acme-agent"
    _attack(sc, "upgrade-one-off-acme-agent", "an agent-named binary under /var/tmp, started "
            "by systemd in the middle of the acme-agent upgrade, fetches the role's credentials",
            h, Proc("acme-agent", exe, "root", "0", *SYSTEMD, exe, pid(), 1),
            up_at + 3 * HOUR)

    # A python host agent; a new node image brings python3.12, node by node over a day.
    image_at = sc.start + 11 * DAY + 6 * HOUR
    for h in hosts:
        u = image_at + rng.uniform(0, DAY)
        for version, lo, hi in (("3.11", _up(sc, h), u), ("3.12", u + 120.0, sc.end)):
            exe = f"/usr/bin/python{version}"
            proc = Proc("host-metrics", exe, "root", "0", *SYSTEMD,
                        f"{exe} /usr/lib/host-metrics/main.py", pid(), 1)
            _emit(sc, h, proc, periodic(rng, lo, hi, 1200), "benign/upgrade-host-metrics",
                  f"Python-urllib/{version}")
    h = rng.choice(aws)
    _attack(sc, "image-one-off-host-metrics", "a python3.12 copied to /dev/shm, named like "
            "the host metrics agent and run from a shell while the new node image rolls out, "
            "fetches the role's credentials",
            h, Proc("host-metrics", "/dev/shm/python3.12", "root", "0", *BASH,
                    "/dev/shm/python3.12 -c ...", pid(), pid()), image_at + 8 * HOUR)
    return sc


def with_identity_lost(sc: Scenario, share: float = LOST_SHARE) -> Scenario:
    """`sc` where `share` of the short-lived benign callers' events lack executable, parent
    and command line (chosen at random per event, seeded)."""
    rng = random.Random(sc.seed * 7919 + 21)
    tr = sc.trace
    lost: dict[int, int] = {}
    for sid, doc in enumerate(list(tr.shape_docs)):
        if doc.get("labels", {}).get("imdswatch_actor") not in SHORT_LIVED:
            continue
        process = {k: v for k, v in doc["process"].items()
                   if k not in ("executable", "command_line", "args", "parent")}
        lost[sid] = tr.add_shape({**doc, "process": process})
    refs = tr.refs
    for i, ref in enumerate(refs):
        if ref in lost and rng.random() < share:
            refs[i] = lost[ref]
    return sc


def rollouts(seed: int, scale: float = 1.0) -> Scenario:
    return with_rollouts(generate(seed, scale))


def identity_lost(seed: int, scale: float = 1.0) -> Scenario:
    return with_identity_lost(generate(seed, scale))


# -- the rows bench reports (accuracy section) ------------------------------------------------

ROLLOUT_TITLES = {
    "benign/rollout-vector": "a new DaemonSet (vector) reaching every node over a day",
    "benign/upgrade-acme-agent": "an agent upgraded on every node (/opt/acme/agent/2.4.1 to "
                                 "2.5.0)",
    "benign/upgrade-host-metrics": "a new node image (python3.11 to python3.12 under a "
                                   "host agent)",
}


def run_alerts(ev) -> list[tuple]:  # noqa: ANN001 - bench.evaluate.Evaluation
    """imdswatch's alerts past its learning period, in time order."""
    run = ev.imdswatch
    return [a for a in run.alerts if a[4] >= run.not_before]


def _alerts_from(ev, source: str) -> list[tuple]:  # noqa: ANN001 - bench.evaluate.Evaluation
    return [a for a in run_alerts(ev) if ev.labels.actor[a[0]] == source]


def _short(r) -> str:  # noqa: ANN001 - bench.evaluate.Result
    return r.system.split(" (")[0]


def variant_rows(seed: int, scale: float, base) -> tuple[list, list[tuple[str, str]]]:  # noqa: ANN001
    """Rows and details for both variants on `seed`; `base` is imdswatch's Result on the
    same seed's unaltered scenario."""
    from bench.evaluate import actor_matrix, details, evaluate_small, table
    from bench.rows import Row

    rows: list[Row] = []
    texts: list[tuple[str, str]] = []
    sc = rollouts(seed, scale)
    ev = evaluate_small(sc, False)
    mine, anchors = ev.results[0], ev.results[1:]
    for source, title in ROLLOUT_TITLES.items():
        alerts = _alerts_from(ev, source)
        severities = ", ".join(sorted({a[5] for a in alerts})) or "none"
        low = all(a[5] == "low" for a in alerts)
        few = min(anchors, key=lambda r: len(r.fp_by_source.get(source, ())))
        rows.append(Row(
            f"rollouts, seed {seed}: alerts for {title} (severity: {severities})", len(alerts),
            "", f"fewest FP entities from it of the anchors ({_short(few)})",
            len(few.fp_by_source.get(source, ())), "<= 1, low severity naming the rollout",
            len(alerts) <= 1 and low))
    one_offs = [a.id for a in sc.actors if a.kind == "rollout_one_off"]
    caught = sum(a in mine.detected for a in one_offs)
    best = max(anchors, key=lambda r: sum(a in r.detected for a in one_offs))
    rows.append(Row(f"rollouts, seed {seed}: attackers' one-offs in the middle of them caught",
                    caught, f"of {len(one_offs)}", f"best anchor ({_short(best)})",
                    sum(a in best.detected for a in one_offs), "all", caught == len(one_offs)))
    first = {}
    for a in run_alerts(ev):
        if ev.labels.attack[a[0]]:
            first.setdefault(ev.labels.actor[a[0]], a[5])
    low_one_offs = sum(first.get(a) == "low" for a in one_offs)
    rows.append(Row(f"rollouts, seed {seed}: of those, first alerted at low severity",
                    low_one_offs, f"of {caught}", "", None, "0 (each at its own severity)",
                    low_one_offs == 0))
    rows.append(Row(f"rollouts, seed {seed}: false-positive entities", len(mine.fp_entities),
                    "", "the same seed without the rollouts", len(base.fp_entities),
                    f"<= {len(base.fp_entities) + len(ROLLOUT_TITLES)} (one per rollout more)",
                    len(mine.fp_entities) <= len(base.fp_entities) + len(ROLLOUT_TITLES)))
    texts.append((f"Rollouts on seed {seed} (bench/variants.py), every system",
                  f"{len(sc.trace)} events, {len(sc.actors)} attack actors\n"
                  f"{table(ev.results)}\n{actor_matrix(sc, ev.results)}\n\n{details(ev)}"))

    sc = identity_lost(seed, scale)
    ev = evaluate_small(sc, False)
    mine = ev.results[0]
    judged_without = {ev.labels.entity[a[0]] for a in ev.imdswatch.alerts
                      if a[4] >= ev.imdswatch.not_before and not ev.labels.attack[a[0]]
                      and "unknown: judged without" in a[3]}
    rows += [
        Row(f"identity lost, seed {seed}: false-positive entities", len(mine.fp_entities), "",
            "the same seed with complete identity", len(base.fp_entities),
            "<= complete identity's", len(mine.fp_entities) <= len(base.fp_entities)),
        Row(f"identity lost, seed {seed}: of which alerted on an event lacking identity",
            len(judged_without), "", "", None, "", None),
        Row(f"identity lost, seed {seed}: recall", round(mine.recall, 2), "",
            "the same seed with complete identity", round(base.recall, 2),
            ">= complete identity's", mine.recall >= base.recall),
    ]
    texts.append((f"Identity lost on seed {seed} (bench/variants.py), every system",
                  f"{len(sc.trace)} events, {len(sc.actors)} attack actors\n"
                  f"{table(ev.results)}\n\n{details(ev)}"))
    return rows, texts
