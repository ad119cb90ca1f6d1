"""The live tracer's four speed figures, measured side by side in one run against
the real agent (`imdswatch run` as a subprocess) and real connects made inside a private
network namespace holding the metadata addresses (never the real service):

1. connect() overhead on non-metadata connections, probe attached vs detached, for the mode
   `auto` picks and for the tracepoint mode side by side; request capture's egress program:
   its run time per packet (bpf_stats) and loopback bulk throughput attached vs detached;
2. detection latency, connect() to the alert line and to the metric, p50 and p99;
3. a connect flood at the mock IMDS: events/s processed, events dropped, kernel counts
   equal to the connects made;
4. agent memory (RSS steady and peak) and time from start to attached.
Figures 2-4 are for the agent with `--probe auto`.

`run(quick)` returns a bench.rows.Section.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.rows import Row, Section

LAB = Path(__file__).resolve().parent.parent / "lab"
IMDS = "169.254.169.254"

# Each connect from a process of its own under a name and a uid never seen: new names on
# one host within minutes are folded into one burst alert after the first few, a new user
# is judged by rare_user, which bursts never fold, so every connect gives an alert line.
_LATENCY_CLIENT = """
import ctypes, json, os, socket, sys, time
n, gap = int(sys.argv[1]), float(sys.argv[2])
libc = ctypes.CDLL(None)
out = []
for i in range(n):
    name = f"imdsw-lat{i}"
    r, w = os.pipe()
    if os.fork() == 0:
        libc.prctl(15, name.encode(), 0, 0, 0)
        os.setgid(61000 + i)
        os.setuid(61000 + i)
        s = socket.socket()
        t = time.time()
        try:
            s.connect(("169.254.169.254", 80))
        except OSError:
            pass
        s.close()
        os.write(w, repr(t).encode())
        os._exit(0)
    os.close(w)
    t = float(os.read(r, 64))
    os.close(r)
    os.wait()
    out.append((name, t))
    time.sleep(gap)
print(json.dumps(out))
"""


def _row(name: str, value: float | None, unit: str, baseline: str = "",
         baseline_value: float | None = None, target: str = "",
         ok: bool | None = None) -> Row:
    if isinstance(value, float):
        value = round(value, 2)
    if isinstance(baseline_value, float):
        baseline_value = round(baseline_value, 2)
    return Row(name, value, unit, baseline, baseline_value, target, ok)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (BPF and network namespaces)"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "needs BCC (python3-bpfcc)"
    return None


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


_ACCEPT_SERVER = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 9000))
s.listen(4096)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.close()
"""


def _loop_us(ns: object, host: str, count: int, port: int = 9) -> float:
    """Microseconds per connect() of the flood client's loop (port 9: refused, no
    listener; port 9000: accepted by _ACCEPT_SERVER)."""
    r = ns.run(["python3", str(LAB / "flood_client.py"), host, str(port), str(count), "30"],
               timeout=60)
    made, seconds = r.stdout.split()
    return float(seconds) / int(made) * 1e6


def _overhead(ns: object, quick: bool) -> list[Row]:
    """The probe on the connect path of connections that are not to a metadata endpoint:
    the same compiled program attached and detached in alternation (the agent's userspace
    never sees these connections, so the attached program is the whole cost). Two loops on
    loopback: connects refused (no listener: the cheapest connect there is, so the worst
    case in relative terms) and connects accepted by a listening server. Measured for the
    mode `auto` picks and for the tracepoint mode, side by side in the same rounds (only one
    of them attached at a time)."""
    import subprocess

    from scoring.endpoints import EndpointCatalog
    from tracer.session import Tracer

    # Many short paired rounds: the noise of a shared 2-core machine (a server process
    # competes for the other core in the accepted loop) averages out better than in few long ones.
    rounds, count = (6, 5000) if quick else (40, 5000)
    # bpf_stats adds two clock reads to every program run: it stays off while overhead is
    # measured (as on a real node) and is switched on only for the program-time phase.
    stats_knob = Path("/proc/sys/kernel/bpf_stats_enabled")
    stats_before = stats_knob.read_text().strip() if stats_knob.exists() else None
    if stats_before is not None:
        stats_knob.write_text("0")
    server = ns.popen(["python3", "-c", _ACCEPT_SERVER], stdout=subprocess.PIPE, text=True)
    server.stdout.readline()
    tracers: dict[str, object] = {}
    samples: dict[tuple[str, int, bool], list[float]] = {}
    runs: dict[str, tuple[int, int]] = {}
    try:
        auto = Tracer(EndpointCatalog.from_config(), probe="auto")
        mode = auto.start()
        tracers[mode] = auto
        auto.pause()
        if mode != "tracepoint":
            tp = Tracer(EndpointCatalog.from_config(), probe="tracepoint")
            tp.start()
            tp.pause()
            tracers["tracepoint"] = tp
        for r in range(rounds):
            for m, t in tracers.items():
                for port in (9, 9000):
                    # Alternate which side goes first, so warm-up and drift hit both alike.
                    for on in ((True, False) if r % 2 else (False, True)):
                        t.resume() if on else t.pause()
                        samples.setdefault((m, port, on), []).append(
                            _loop_us(ns, "127.0.0.1", count, port))
                t.pause()
                t.poll(0)
        if stats_before is not None:
            stats_knob.write_text("1")  # the kernel now times every run of every program
            for m, t in tracers.items():
                before = _prog_runs(t)
                t.resume()
                for port in (9, 9000):
                    _loop_us(ns, "127.0.0.1", count, port)
                t.pause()
                after = _prog_runs(t)
                runs[m] = (after[0] - before[0], after[1] - before[1])
    finally:
        if stats_before is not None:
            stats_knob.write_text(stats_before)
        for t in tracers.values():
            t.close()
        server.kill()
        server.wait(5)
    rows: list[Row] = []
    for m in tracers:
        label = f"{m} (auto)" if m == mode else m
        for port, what in ((9, "refused"), (9000, "accepted")):
            d = statistics.median(samples[(m, port, False)])
            a = statistics.median(samples[(m, port, True)])
            # Paired: each round's attached run against its own detached run, measured next
            # to each other, so slow drift of a shared machine cancels; then the median round.
            pct = statistics.median(
                (on - off) / off * 100 for on, off in
                zip(samples[(m, port, True)], samples[(m, port, False)], strict=True))
            rows.append(_row(f"tracer: non-metadata connect() ({what}), {label} attached", a,
                             "us", "detached", d, "<= +1%", pct <= 1.0))
            rows.append(_row(f"tracer: overhead of {label} on {what} connects "
                             f"({rounds}x{count} each side)", pct, "%", target="<= 1%",
                             ok=pct <= 1.0))
        n, run_ns = runs.get(m, (0, 0))
        if n:
            rows.append(_row(f"tracer: {label} BPF program time per run ({n:,} runs)",
                             run_ns / n, "ns", target="report"))
            # The program's own share of a connect, from the kernel's run-time accounting
            # (2 x count connects were made while it was timed): free of scheduling noise.
            per_connect_us = run_ns / (2 * count) / 1000
            d_refused = statistics.median(samples[(m, 9, False)])
            rows.append(_row(f"tracer: {label} program time per connect, share of a refused "
                             "connect", per_connect_us / d_refused * 100, "%", target="report"))
    return rows


_BULK_SERVER = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 9100))
s.listen(16)
print("ready", flush=True)
buf = bytearray(1 << 20)
while True:
    c, _ = s.accept()
    while c.recv_into(buf):
        pass
    c.sendall(b"k")
    c.close()
"""

_BULK_CLIENT = """
import socket, sys, time
n = int(sys.argv[1])
chunk = b"x" * (256 * 1024)
s = socket.create_connection(("127.0.0.1", 9100))
t = time.perf_counter()
sent = 0
while sent < n:
    s.sendall(chunk)
    sent += len(chunk)
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(sent / (time.perf_counter() - t) / 1e6)
"""

# Small segments: one byte per send with TCP_NODELAY, answered, so each is its own packet.
_PINGPONG_CLIENT = """
import socket, sys
n = int(sys.argv[1])
s = socket.create_connection(("127.0.0.1", 9101))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for _ in range(n):
    s.sendall(b"p")
    s.recv(1)
"""
_PINGPONG_SERVER = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 9101))
s.listen(4)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while c.recv(1):
        c.sendall(b"q")
    c.close()
"""


def _request_capture(ns: object, quick: bool) -> list[Row]:
    """Request capture's price on traffic that is not to a metadata endpoint: the egress
    program runs for every packet the machine sends. (1) its run time per packet from the
    kernel's accounting (bpf_stats), over a loopback ping-pong of one-byte segments and a
    bulk transfer; (2) loopback bulk-transfer throughput with it attached vs detached, in
    alternating paired rounds."""
    import subprocess

    from scoring.endpoints import EndpointCatalog
    from tracer.session import Tracer

    rounds, size = (4, 128 << 20) if quick else (12, 512 << 20)
    stats_knob = Path("/proc/sys/kernel/bpf_stats_enabled")
    stats_before = stats_knob.read_text().strip() if stats_knob.exists() else None
    servers = [ns.popen(["python3", "-c", code], stdout=subprocess.PIPE, text=True)
               for code in (_BULK_SERVER, _PINGPONG_SERVER)]
    for srv in servers:
        srv.stdout.readline()
    t = Tracer(EndpointCatalog.from_config(), probe="cgroup")
    rows: list[Row] = []
    try:
        t.start()
        if t.tracker is None:
            return [_row(f"tracer: request capture unavailable ({t.requests_unavailable})",
                         None, "")]
        if stats_before is not None:
            stats_knob.write_text("0")
        on: list[float] = []
        off: list[float] = []

        def bulk() -> float:
            r = ns.run(["python3", "-c", _BULK_CLIENT, str(size)], timeout=120)
            return float(r.stdout.strip())

        for r in range(rounds):
            for attached in ((True, False) if r % 2 else (False, True)):
                t.resume() if attached else t.pause()
                (on if attached else off).append(bulk())
        t.resume()
        a, d = statistics.median(on), statistics.median(off)
        pct = statistics.median((x - y) / y * 100 for x, y in zip(on, off, strict=True))
        rows.append(_row(f"tracer: loopback bulk transfer, request capture attached "
                         f"({rounds}x{size >> 20} MiB each side)", a, "MB/s", "detached", d,
                         "report"))
        rows.append(_row("tracer: bulk throughput change with request capture", pct, "%",
                         target="report (paired median)"))
        if stats_before is not None:
            # An empty cgroup_skb program beside ours, timed in the same runs: what the
            # kernel's accounting and dispatch cost by themselves.
            import bcc

            from tracer import cgroup_attach

            empty = bcc.BPF(text=b"int imdsw_empty(struct __sk_buff *skb) { return 1; }")
            efd = empty.load_func(b"imdsw_empty", bcc.BPF.CGROUP_SKB,
                                  attach_type=cgroup_attach.CGROUP_INET_EGRESS).fd
            att = cgroup_attach.CgroupAttachment(t._bpf.imdsw_requests.root)
            att.attach(efd, cgroup_attach.CGROUP_INET_EGRESS)
            stats_knob.write_text("1")
            egress = t._bpf.funcs[b"imdsw_egress"].fd
            for label, argv in (
                ("one-byte ping-pong segments", ["python3", "-c", _PINGPONG_CLIENT,
                                                 "20000" if quick else "100000"]),
                ("bulk-transfer packets", ["python3", "-c", _BULK_CLIENT, str(size)]),
            ):
                n0, ns0 = _fd_runs(egress)
                e0, ens0 = _fd_runs(efd)
                ns.run(argv, timeout=180)
                n1, ns1 = _fd_runs(egress)
                e1, ens1 = _fd_runs(efd)
                if n1 > n0 and e1 > e0:
                    rows.append(_row(f"tracer: request capture program time per packet, "
                                     f"{label} ({n1 - n0:,} runs)", (ns1 - ns0) / (n1 - n0),
                                     "ns", "empty cgroup_skb program", (ens1 - ens0) / (e1 - e0),
                                     "report (a few comparisons over the empty program)"))
            stats_knob.write_text("0")
            att.close()
            empty.cleanup()
    finally:
        if stats_before is not None:
            stats_knob.write_text(stats_before)
        t.close()
        for srv in servers:
            srv.kill()
            srv.wait(5)
    return rows


def _fd_runs(fd: int) -> tuple[int, int]:
    fields = dict(line.split(":\t", 1) for line in
                  Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines() if ":\t" in line)
    return int(fields.get("run_cnt", 0)), int(fields.get("run_time_ns", 0))


def _prog_runs(tracer: object) -> tuple[int, int]:
    """(runs, total ns) of the tracer's BPF programs, from their fdinfo (bpf_stats)."""
    runs = total = 0
    for fn in getattr(tracer._bpf, "funcs", {}).values():
        try:
            info = Path(f"/proc/self/fdinfo/{fn.fd}").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in info.splitlines() if ":\t" in line)
        runs += int(fields.get("run_cnt", 0))
        total += int(fields.get("run_time_ns", 0))
    return runs, total


class _Watcher:
    """Notes when each latency client's alert line and its metric series first appear, from
    two polling threads. Both are keyed by the client's process name, so other metadata
    traffic on the machine (the probe sees every namespace) is never taken for ours."""

    def __init__(self, agent: object) -> None:
        self.agent = agent
        self.alert_seen: dict[str, float] = {}
        self.metric_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._alerts, daemon=True),
                         threading.Thread(target=self._metrics, daemon=True)]

    def _alerts(self) -> None:
        pos = 0
        while not self._stop.is_set():
            try:
                with open(self.agent.alerts, "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            now = time.time()
            if chunk:
                complete = chunk[: chunk.rfind(b"\n") + 1]
                pos += len(complete)
                for line in complete.splitlines():
                    name = json.loads(line)["process"]["name"]
                    self.alert_seen.setdefault(name, now)
            time.sleep(0.0005)

    def _metrics(self) -> None:
        while not self._stop.is_set():
            text = self.agent.get("/metrics")[1]
            now = time.time()
            for name in _LATENCY_SERIES.findall(text):
                self.metric_seen.setdefault(name, now)
            time.sleep(0.001)

    def __enter__(self) -> _Watcher:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)


# A latency client's per-process connection count, the first metric its connect moves.
_LATENCY_SERIES = re.compile(
    r'^imdswatch_metadata_connections_total\{[^}]*process="(imdsw-lat\d+)"', re.M)


def _latency(ns: object, agent: object, quick: bool) -> list[Row]:
    n = 30 if quick else 200
    with _Watcher(agent) as w:
        time.sleep(0.1)
        r = ns.run(["python3", "-c", _LATENCY_CLIENT, str(n), "0.03"], timeout=120)
        connects = json.loads(r.stdout)
        deadline = time.time() + 5
        while time.time() < deadline and (len(w.alert_seen) < n or len(w.metric_seen) < n):
            time.sleep(0.05)
    rows = []
    for label, seen in (("alert line", w.alert_seen), ("metric", w.metric_seen)):
        values = [(seen[name] - t) * 1000 for name, t in connects if name in seen]
        if not values:
            rows.append(_row(f"tracer: latency connect -> {label}", None, "ms",
                             target="p99 < 100 ms", ok=False))
            continue
        p50, p99 = _pct(values, 0.5), _pct(values, 0.99)
        rows.append(_row(f"tracer: latency connect -> {label} p50 ({len(values)}/{n})", p50,
                         "ms", target="p99 < 100 ms", ok=p50 < 100))
        rows.append(_row(f"tracer: latency connect -> {label} p99 ({len(values)}/{n})", p99,
                         "ms", target="< 100 ms", ok=p99 < 100))
    return rows


def _flood(ns: object, agent: object, quick: bool) -> list[Row]:
    per_client = 20000 if quick else 100000
    names = [f"imdsw-flood{i}" for i in range(2)]  # two loops: one per core of the machine

    def ours(metric: str) -> float:
        # By process name: the probe sees every namespace, and other metadata traffic on a
        # shared machine must not be counted as the flood's.
        return sum(agent.metric(metric, process=n) for n in names)

    time.sleep(1.5)  # the agent publishes kernel counters every second: let them settle
    seen0 = ours("imdswatch_metadata_connections_total")
    kc0 = ours("imdswatch_kernel_connections_by_process_total")
    drop0 = agent.metric("imdswatch_kernel_events_dropped_total")
    clients = [ns.popen(["python3", str(LAB / "flood_client.py"), IMDS, "9",
                         str(per_client), "20", name], stdout=-1, text=True) for name in names]
    t0 = time.time()
    outs = [c.communicate(timeout=60)[0].split() for c in clients]
    made = sum(int(o[0]) for o in outs)
    loop_rate = made / max(float(o[1]) for o in outs)
    # Wait until the agent has consumed the buffer and published the kernel counters.
    last, last_change = ours("imdswatch_metadata_connections_total"), time.time()
    while time.time() - last_change < 1.5 and time.time() - t0 < 60:
        time.sleep(0.05)
        v = ours("imdswatch_metadata_connections_total")
        if v != last:
            last, last_change = v, time.time()
    processed = last - seen0
    rate = processed / max(last_change - t0, 1e-6)
    kernel = ours("imdswatch_kernel_connections_by_process_total") - kc0
    dropped = agent.metric("imdswatch_kernel_events_dropped_total") - drop0
    return [
        _row("tracer: flood events processed", rate, "events/s", "connect loop", loop_rate,
             "report"),
        _row("tracer: flood events dropped (counted; any process's)", dropped, "events",
             target="flood's processed + dropped >= connects",
             ok=processed + dropped >= made),
        _row(f"tracer: flood's kernel count - connects made ({made:,})", kernel - made, "",
             target="= 0", ok=kernel == made),
    ]


NOTES = [
    "Overhead: the compiled probe attached and detached in alternation (paired rounds, the "
    "median of each round's attached-vs-detached difference), on connects that are not to a "
    "metadata endpoint, on loopback inside a private network namespace: refused connects (no "
    "listener: the cheapest connect there is, so the worst case in relative terms) and "
    "accepted ones, for the mode `auto` picks and for the tracepoint mode. The programs' own "
    "time comes from the kernel's run-time accounting (bpf_stats), switched on only for its "
    "own phase; request capture's egress program is timed beside an empty cgroup_skb "
    "program in the same runs (the accounting and dispatch alone). A shared 2-core machine "
    "moves single rounds by tens of percent: compare program times, not one round.",
    "Latency: the real agent (`imdswatch run`, probe auto, a warmed state, threshold 1, no "
    "alert-line cap) and connects in the namespace, each from a process with a name and a "
    "uid never seen (new names within minutes fold into one burst alert; a new user alerts "
    "on its own); the time from the client's connect() to its alert line in the agent's "
    "output, and to its own series of `imdswatch_metadata_connections_total` on /metrics "
    "(both by process name, so other metadata traffic on the machine is not taken for "
    "ours). This is what the live path adds to the scorer's event-time detection latency "
    "(accuracy section).",
    "Flood: two connect loops at the mock metadata address, one per core, under names of "
    "their own; the agent's events of those names processed, and the kernel's per-process "
    "count of those names against the connects made (drops at the ring buffer are counted "
    "for all processes together, other metadata traffic on the machine included). RSS: the agent's "
    "VmRSS after start and the latency run, and its VmHWM, which includes the BPF compile "
    "at start and the flood.",
]


def run(quick: bool = False) -> Section:
    """The four figures; one row saying why when the machine cannot trace."""
    reason = _skip_reason()
    if reason:
        return Section([_row(f"tracer: skipped ({reason})", None, "")])
    from lab.agent_process import AgentProcess
    from lab.history import warm_state
    from lab.sandbox import Sandbox as MetadataNamespace

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="imdsw-bench-") as tmpdir, \
            MetadataNamespace(v4=(IMDS,), v6=()) as ns:
        tmp = Path(tmpdir)
        rows += _overhead(ns, quick)
        rows += _request_capture(ns, quick)
        state = tmp / "state.json"
        warm_state(state)
        # Threshold 1 and no alert-line cap: every latency connect becomes an alert line, so
        # each one gives a sample (the default cap writes 100 lines per 15 minutes).
        (tmp / "main").mkdir()
        config = tmp / "main" / "imdswatch.toml"
        config.write_text("[alerts]\nmax_per_window = 0\n")
        agent = AgentProcess(tmp / "main", "--state", str(state), "--learning-period", "0s",
                             "--threshold", "1", "--config", str(config))
        agent.start()
        try:
            attach_s = agent.ready_after
            time.sleep(0.5)
            rows += _latency(ns, agent, quick)
            steady = agent.rss_kb()[0]
            rows += _flood(ns, agent, quick)
            peak = agent.rss_kb()[1]
        finally:
            rc, stop_s = agent.stop()
        rows += [
            _row("tracer: agent RSS after start and the latency run", steady / 1024, "MiB",
                 target="report"),
            _row("tracer: agent peak RSS (VmHWM: start-up compile, then the connect flood)",
                 peak / 1024, "MiB", target="report"),
            _row("tracer: agent start -> attached", attach_s, "s", target="report"),
            _row("tracer: agent SIGTERM -> exit 0", stop_s, "s", target="< 5 s",
                 ok=rc == 0 and stop_s < 5),
        ]
    return Section(rows, list(NOTES))


if __name__ == "__main__":
    from bench.rows import render

    print(render("tracer", [r.as_dict() for r in run(quick="--quick" in sys.argv).rows]))
