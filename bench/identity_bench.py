"""The kernel's identity record (bpf/identity.h): what it costs and how complete it makes a
short-lived caller's identity.

1. Its programs' run time per exec, fork and exit, from the kernel's run-time accounting
   (bpf_stats), beside an empty raw tracepoint program on the same hook timed in the same
   runs (the dispatch and accounting alone): the difference is the recording's own cost.
2. Exec throughput (spawn /bin/true and wait, in a loop) with the record's programs attached
   vs detached, in alternating paired rounds.
3. Completeness: a copy of curl at a fixed path calling the mock metadata service inside a
   private namespace and exiting at once, on a machine kept busy by two bounded busy loops,
   with the tracer `auto` picks: the share of its events carrying the executable, the
   parent's name and the command line (goal 100 %), and the share that had them from /proc.

`run(quick)` returns a bench.rows.Section.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.rows import Row, Section

IMDS = "169.254.169.254"
HOOKS = ("sched_process_exec", "sched_process_fork", "sched_process_exit")

_SPAWN_LOOP = """
import os, sys, time
n = int(sys.argv[1])
t = time.perf_counter()
for _ in range(n):
    pid = os.posix_spawn("/bin/true", ["/bin/true"], {})
    os.waitpid(pid, 0)
print(n / (time.perf_counter() - t))
"""

_EMPTY = "\n".join(f"RAW_TRACEPOINT_PROBE({h}) {{ return 0; }}" for h in HOOKS)


def _row(name: str, value: float | None, unit: str, baseline: str = "",
         baseline_value: float | None = None, target: str = "", ok: bool | None = None) -> Row:
    if isinstance(value, float):
        value = round(value, 2)
    if isinstance(baseline_value, float):
        baseline_value = round(baseline_value, 2)
    return Row(name, value, unit, baseline, baseline_value, target, ok)


def _runs(fd: int) -> tuple[int, int]:
    fields = dict(line.split(":\t", 1) for line in
                  Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines() if ":\t" in line)
    return int(fields.get("run_cnt", 0)), int(fields.get("run_time_ns", 0))


def _spawn_rate(n: int) -> float:
    r = subprocess.run([sys.executable, "-c", _SPAWN_LOOP, str(n)], capture_output=True,
                       text=True, timeout=300, check=True)
    return float(r.stdout.strip())


def _cost(quick: bool) -> list[Row]:
    import bcc

    from tracer import btf, probes

    offsets = btf.task_offsets()
    offsets.update(btf.record_offsets())
    b = probes.compile_mode("tracepoint", offsets=offsets)
    empty = None
    knob = Path("/proc/sys/kernel/bpf_stats_enabled")
    knob_before = knob.read_text().strip()
    rounds, n = (4, 500) if quick else (12, 2000)
    rows: list[Row] = []
    try:
        knob.write_text("0")  # off while throughput is measured, as on a real node
        on: list[float] = []
        off: list[float] = []
        attached = False
        for r in range(rounds):
            for want in ((True, False) if r % 2 else (False, True)):
                if want and not attached:
                    probes.attach_identity(b)
                elif not want and attached:
                    probes.detach_identity(b)
                attached = want
                (on if want else off).append(_spawn_rate(n))
        if not attached:
            probes.attach_identity(b)
        pct = statistics.median((a - d) / d * 100 for a, d in zip(on, off, strict=True))
        rows.append(_row(f"identity: exec throughput (spawn /bin/true and wait), record "
                         f"attached ({rounds}x{n:,} each side)", statistics.median(on),
                         "execs/s", "detached", statistics.median(off), "report"))
        rows.append(_row("identity: exec throughput change with the record", pct, "%",
                         target="report (paired median)"))
        # BCC attaches raw_tracepoint__* functions as it loads them.
        empty = bcc.BPF(text=_EMPTY.encode())
        ours = {h: b.funcs[f"raw_tracepoint__{h}".encode()].fd for h in HOOKS}
        base = {h: empty.funcs[f"raw_tracepoint__{h}".encode()].fd for h in HOOKS}
        before = {h: (_runs(ours[h]), _runs(base[h])) for h in HOOKS}
        knob.write_text("1")
        _spawn_rate(n * 2)
        knob.write_text("0")
        for h in HOOKS:
            (n0, t0), (e0, et0) = before[h]
            (n1, t1), (e1, et1) = _runs(ours[h]), _runs(base[h])
            if n1 <= n0 or e1 <= e0:
                rows.append(_row(f"identity: {h} not timed (no runs counted)", None, ""))
                continue
            mine, floor = (t1 - t0) / (n1 - n0), (et1 - et0) / (e1 - e0)
            rows.append(_row(f"identity: {h} program time per run ({n1 - n0:,} runs)", mine,
                             "ns", "empty raw tracepoint, same hook", floor, "report"))
            rows.append(_row(f"identity: recording cost per {h.split('_')[-1]} (ours - empty)",
                             mine - floor, "ns", target="report"))
    finally:
        knob.write_text(knob_before)
        probes.release(b)
        if empty is not None:
            empty.cleanup()
    return rows


def _completeness(quick: bool) -> list[Row]:
    from lab.sandbox import Sandbox
    from scoring.endpoints import EndpointCatalog
    from tracer.session import Tracer

    calls = 20 if quick else 60
    curl = shutil.which("curl")
    if curl is None:
        return [_row("identity: completeness not measured (no curl)", None, "")]
    with tempfile.TemporaryDirectory(prefix="imdsw-idbench-") as tmp, \
            Sandbox("imdsw-idbench", (IMDS,), (), (80,)) as ns:
        copy = Path(tmp) / f"idbench-{os.getpid() % 10000}"
        shutil.copy(curl, copy)
        name = copy.name[:15]
        load = [subprocess.Popen([sys.executable, "-c",
                                  "import time\nend = time.monotonic() + 300\n"
                                  "while time.monotonic() < end: pass\n"]) for _ in range(2)]
        t = Tracer(EndpointCatalog.from_config(), probe="auto")
        docs: list[dict] = []
        try:
            mode = t.start()
            for _ in range(calls):
                ns.run([str(copy), "-s", "-o", "/dev/null", "-m", "3",
                        f"http://{IMDS}/latest/meta-data/"])
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                docs += [d for d in t.poll(100) if d["process"]["name"] == name]
                if len(docs) >= calls:
                    break
        finally:
            t.close()
            for p in load:
                p.kill()
                p.wait(5)
    complete = [d for d in docs if d["process"].get("executable") == str(copy)
                and d["process"].get("parent", {}).get("name")
                and d["process"].get("command_line")]
    from_proc = [d for d in docs if d["imdswatch"].get("identity", {}).get("from_proc")]
    share = 100.0 * len(complete) / calls
    return [
        _row(f"identity: short-lived callers with executable, parent and command line "
             f"({calls} calls of a curl copy under CPU load, probe {mode})", share, "%",
             target="100 %", ok=len(complete) == calls),
        _row("identity: of those events, any field taken from /proc", len(from_proc),
             "events", target="report"),
    ]


NOTES = [
    "Identity record: its raw tracepoint programs (exec, fork, exit) timed by the kernel's "
    "run-time accounting (bpf_stats, switched on only for that phase) over a loop spawning "
    "/bin/true, beside empty raw tracepoint programs attached to the same hooks and timed in "
    "the same runs; the difference is what recording costs per exec, fork and exit. No "
    "connect and no packet runs these programs. Exec throughput: the same loop with the "
    "programs attached and detached in alternating rounds (median of the paired "
    "differences). Completeness: a copy of curl calling the mock metadata service in a "
    "private namespace and exiting at once, on two cores kept busy by two busy loops.",
]


def run(quick: bool = False) -> Section:
    if os.geteuid() != 0:
        return Section([_row("identity: skipped (needs root for BPF)", None, "")])
    try:
        import bcc  # noqa: F401
    except ImportError:
        return Section([_row("identity: skipped (needs BCC, python3-bpfcc)", None, "")])
    return Section(_cost(quick) + _completeness(quick), list(NOTES))


if __name__ == "__main__":
    from bench.rows import render

    print(render("identity", [r.as_dict() for r in run(quick="--quick" in sys.argv).rows]))
