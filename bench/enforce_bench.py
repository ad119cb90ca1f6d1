"""Enforcement on the labelled scenario: a policy learned from the first days of the trace
(`imdswatch policy generate` on a model replayed from them, `default = "deny"`), applied to
the rest exactly as the agent decides (`Policy.decide`: the connect, then the request's
class), beside the static equivalents an operator has today:

- hop limit 1: IMDSv2 answers do not reach pod-network containers, so a container's token
  handshake and its token-carrying requests fail (its IMDSv1 requests still work; the
  events do not say which pods share the node's network, so every container counts);
- a uid allowlist (AWS's iptables owner rule): the users seen calling in the first days;
- the known-agent catalog alone, default deny.

Counted after the learning days: attack actors blocked (one of their calls denied), and
benign calls denied, with the distinct benign callers (host, process, user) listed.

What other traffic pays (`overhead`): the enforcement programs' kernel run time per
non-metadata connect (bpf_stats: the connect4 program, and the sock_ops program that picks
the sockets whose requests are judged) beside empty programs of the same types linked to
the same cgroup in the same runs (the accounting floor), and a connect loop's rate in the
enforced cgroup with the programs linked vs not, in alternating paired rounds; per message,
bench/enforce_msg_bench.py.
`run(quick, seed)` returns a bench.rows.Section.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.evaluate import labels_of, read_events
from bench.rows import Row, Section
from bench.scenario import generate
from policy.learn import LearnOptions, learn_policy, table
from policy.model import DENY, Caller, Policy
from scoring.detectors import request_class, user_of
from scoring.endpoints import SESSION, EndpointCatalog
from scoring.events import Event
from scoring.rarity import DAY
from scoring.scorer import Scorer

LEARN_DAYS = 3


@dataclass
class Outcome:
    name: str
    blocked: set = field(default_factory=set)  # attack actors with a denied call
    benign_denied: int = 0
    benign_callers: Counter = field(default_factory=Counter)  # (host, process, user) -> calls


def _policy_judge(policy: Policy, catalog: EndpointCatalog) -> Callable[[Event], bool]:
    def denied(e: Event) -> bool:
        ep = catalog.match(e.dst_ip, e.dst_port)
        ep_id = ep.id if ep is not None else None
        caller = Caller.of_event(e)
        if policy.decide(caller, ep_id, None).denied:
            return True
        cls = request_class(e)
        return cls is not None and policy.decide(caller, ep_id, cls).denied
    return denied


def _hop_limit(e: Event) -> bool:
    in_container = e.container_id is not None or e.image is not None
    return in_container and (request_class(e) == SESSION or e.guarded is True)


def run(quick: bool, seed: int = 7) -> Section:
    sc = generate(seed, 0.25 if quick else 1.0)
    labels = labels_of(sc)
    split = sc.start + LEARN_DAYS * DAY
    catalog = EndpointCatalog.from_config()
    scorer = Scorer()
    rest: list[tuple[int, Event]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scenario-unlabelled.ndjson.gz"
        sc.write(path, labels=False)
        for i, e in read_events(path):
            if catalog.match(e.dst_ip, e.dst_port) is None:
                continue  # not a metadata call: no policy, nor the kernel, judges it
            if e.ts < split:
                scorer.process(e)
            else:
                rest.append((i, e))
    learned = learn_policy(scorer, LearnOptions(source=f"the first {LEARN_DAYS} days"))
    policy = Policy(learned.rules, DENY)
    users = table(scorer, "rare_user").contexts.get(None)  # the users the model saw call
    learned_users = {v for v in users.values if v is not None} if users is not None else set()
    catalog_only = Policy(tuple(r for r in learned.rules if r.origin.kind == "catalog"), DENY)
    systems: list[tuple[str, Callable[[Event], bool]]] = [
        ("learned policy", _policy_judge(policy, catalog)),
        ("hop limit 1", _hop_limit),
        ("uid allowlist (users of the learning days)",
         lambda e: user_of(e) not in learned_users),
        ("known-agent catalog alone", _policy_judge(catalog_only, catalog)),
    ]
    outcomes = [Outcome(name) for name, _ in systems]
    actors_after: set[str] = set()
    for i, e in rest:
        attack = labels.attack[i]
        if attack:
            actors_after.add(labels.actor[i])
        for out, (_, judge) in zip(outcomes, systems, strict=True):
            if not judge(e):
                continue
            if attack:
                out.blocked.add(labels.actor[i])
            else:
                out.benign_denied += 1
                out.benign_callers[labels.entity[i]] += 1
    n = len(actors_after)
    mine, anchors = outcomes[0], outcomes[1:]
    scope = f"seed {seed}{', quick scale' if quick else ''}"
    rows = [Row(f"enforcement: attack actors blocked, {scope}", len(mine.blocked), "",
                f"of {n} attack actors after day {LEARN_DAYS}", n, "every actor",
                len(mine.blocked) == n)]
    for a in anchors:
        rows.append(Row(f"enforcement: attack actors blocked by {a.name}", len(a.blocked), "",
                        "learned policy", len(mine.blocked), "", None))
    benign = len(rest) - sum(labels.attack[i] for i, _ in rest)
    rows.append(Row(f"enforcement: benign metadata calls denied, {scope}", mine.benign_denied,
                    "", f"of {benign} benign metadata calls", None, "", None))
    rows.append(Row("enforcement: benign callers denied (host, process, user)",
                    len(mine.benign_callers), "", "fewest of the static equivalents",
                    min(len(a.benign_callers) for a in anchors), "", None))
    for a in anchors:
        rows.append(Row(f"enforcement: benign callers denied by {a.name}",
                        len(a.benign_callers), "", "", None, "", None))
    listed = "\n".join(f"{h} {p} {u}: {c} calls" for (h, p, u), c in
                       sorted(mine.benign_callers.items(), key=lambda kv: -kv[1]))
    rows += overhead(quick)
    from bench.enforce_msg_bench import message_rows

    rows += message_rows(quick)
    return Section(
        rows,
        notes=[f"A policy learned from the first {LEARN_DAYS} days of the scenario (callers "
               "seen on 2+ hosts or 2+ days, their request classes, the known-agent catalog) "
               "with default deny, applied to the remaining days by Policy.decide, the "
               "decision the agent and the kernel projection share; the static equivalents "
               "as the module docstring of bench/enforce_bench.py models them."],
        details=[("benign callers the learned policy denies", listed or "(none)"),
                 ("attack actors the learned policy lets through", "\n".join(
                     f"{a.id} ({a.kind}): {a.description}" for a in sc.actors
                     if a.id in actors_after and a.id not in mine.blocked) or "(none)")],
    )


# -- what other traffic pays ------------------------------------------------------------------

_CONNECT_LOOP = """
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
t = time.perf_counter()
for _ in range(n):
    s = socket.socket()
    s.connect(("127.0.0.1", port))
    s.close()
print(n / (time.perf_counter() - t))
"""

_EMPTY_CONNECT = """
int empty4(struct bpf_sock_addr *ctx) { return 1; }
int empty_sockops(struct bpf_sock_ops *ctx) { return 1; }
"""


def prog_runs(fd: int) -> tuple[int, int]:
    """(run count, total run time in ns) of a loaded program, from its fdinfo."""
    fields = dict(line.split(":\t", 1) for line in
                  Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines() if ":\t" in line)
    return int(fields.get("run_cnt", 0)), int(fields.get("run_time_ns", 0))


def remove_cgroup(cg: Path) -> None:
    """Remove a bench cgroup once its processes have gone (bounded wait)."""
    for _ in range(50):
        try:
            cg.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def overhead(quick: bool) -> list[Row]:
    """The enforcement program's run time per non-metadata connect, beside an empty
    program on the same hook in the same runs (the accounting floor), and the connect rate
    of a loop in the enforced cgroup with the programs linked vs not. Attached only to a
    cgroup made for this, holding only the loop's process, removed afterwards."""
    import os
    import secrets
    import socket
    import subprocess
    import sys

    import bcc

    from policy.kernel_rules import request_patterns
    from tracer import cgroup_attach
    from tracer.enforcer import CGROUP_SOCK_OPS, KernelEnforcer, KernelRules

    n = 2000 if quick else 20000
    rounds = 3 if quick else 7
    cg = Path(cgroup_attach.cgroup2_root()) / f"imdsw-bench-enforce-{secrets.token_hex(4)}"
    cg.mkdir()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4096)
    port = server.getsockname()[1]
    stop = False

    def accept() -> None:
        while not stop:
            try:
                c, _ = server.accept()
                c.close()
            except OSError:
                return

    import threading

    threading.Thread(target=accept, daemon=True).start()

    def rate(count: int) -> float:
        def enter() -> None:
            (cg / "cgroup.procs").write_text(str(os.getpid()))

        out = subprocess.run([sys.executable, "-c", _CONNECT_LOOP, str(port), str(count)],
                             capture_output=True, text=True, timeout=600, preexec_fn=enter)
        return float(out.stdout.strip())

    knob = Path("/proc/sys/kernel/bpf_stats_enabled")
    knob_before = knob.read_text().strip()
    enf = KernelEnforcer(EndpointCatalog.from_config(), str(cg))
    empty = bcc.BPF(text=_EMPTY_CONNECT.encode(), cflags=["-Wno-ignored-attributes"])
    att = None
    rows: list[Row] = []
    try:
        enf.start(KernelRules(default_deny=True), lambda rec: None, request_patterns())
        if enf.requests_unavailable is not None:
            raise RuntimeError(enf.requests_unavailable)
        enf.arm(True)
        programs = (("imdsw_enforce4", 10), ("imdsw_enforce6", 11),
                    ("imdsw_sockops", CGROUP_SOCK_OPS))

        def link() -> None:
            enf.attachment = cgroup_attach.CgroupAttachment(str(cg))
            for name, hook in programs:
                enf.attachment.attach_link(enf.bpf.funcs[name.encode()].fd, hook)

        on, off = [], []
        linked = True
        for r in range(rounds):
            for want in ((True, False) if r % 2 else (False, True)):
                if want != linked:
                    if want:
                        link()
                    else:
                        enf.attachment.close()
                    linked = want
                (on if want else off).append(rate(n))
        if not linked:
            link()
        fn = empty.load_func(b"empty4", bcc.BPF.CGROUP_SOCK_ADDR, attach_type=10)
        ops = empty.load_func(b"empty_sockops", bcc.BPF.SOCK_OPS)
        att = cgroup_attach.CgroupAttachment(str(cg))
        att.attach_link(fn.fd, 10)
        att.attach_link(ops.fd, CGROUP_SOCK_OPS)
        ours_fd = enf.bpf.funcs[b"imdsw_enforce4"].fd
        ours_ops = enf.bpf.funcs[b"imdsw_sockops"].fd
        n0, t0 = prog_runs(ours_fd)
        e0, et0 = prog_runs(fn.fd)
        o0, ot0 = prog_runs(ours_ops)
        p0, pt0 = prog_runs(ops.fd)
        knob.write_text("1")
        rate(n)
        knob.write_text("0")
        n1, t1 = prog_runs(ours_fd)
        e1, et1 = prog_runs(fn.fd)
        o1, ot1 = prog_runs(ours_ops)
        p1, pt1 = prog_runs(ops.fd)
        if o1 > o0 and p1 > p0:
            per_conn, floor_conn = (ot1 - ot0) / n, (pt1 - pt0) / n
            rows.append(Row(f"enforcement: sock_ops time per non-metadata connect "
                            f"({(o1 - o0) / n:.1f} runs each)", round(per_conn, 1), "ns",
                            "empty sock_ops program, same cgroup and runs",
                            round(floor_conn, 1), "report", None))
            rows.append(Row("enforcement: sock_ops cost per non-metadata connect "
                            "(ours - empty)", round(per_conn - floor_conn, 1), "ns", "", None,
                            "nothing above the floor", None))
        if n1 > n0 and e1 > e0:
            mine, floor = (t1 - t0) / (n1 - n0), (et1 - et0) / (e1 - e0)
            rows.append(Row(f"enforcement: program time per non-metadata connect "
                            f"({n1 - n0:,} runs)", round(mine, 1), "ns",
                            "empty connect4 program, same cgroup and runs", round(floor, 1),
                            "report", None))
            rows.append(Row("enforcement: cost per non-metadata connect (ours - empty)",
                            round(mine - floor, 1), "ns", "", None, "nothing above the floor",
                            None))
        pct = statistics.median((a - d) / d * 100 for a, d in zip(on, off, strict=True))
        rows.append(Row(f"enforcement: connects/s in the enforced cgroup, linked "
                        f"({rounds}x{n:,} each side)", round(statistics.median(on)), "/s",
                        "not linked", round(statistics.median(off)), "report", None))
        rows.append(Row("enforcement: connect rate change when linked (paired median)",
                        round(pct, 1), "%", "", None, "report", None))
    finally:
        stop = True
        knob.write_text(knob_before)
        if att is not None:
            att.close()
        enf.close()
        empty.cleanup()
        server.close()
        remove_cgroup(cg)
    return rows
