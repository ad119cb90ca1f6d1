"""`imdswatch demo`: see the agent catch metadata credential theft, in under a minute.

Everything happens in a private network namespace served by a mock metadata service
(`lab.sandbox`), so no real metadata service is ever contacted:

1. a synthetic history (two days of cloud agents calling the service on ten nodes) is
   replayed into a model, so the agent starts warm instead of learning for a day;
2. the real agent (`imdswatch run`, the real BPF probe) starts from that model;
3. a stand-in for the AWS SSM agent, at its packaged path, calls the service: no alert;
4. the attack simulations of `lab.attacks` run one by one, each shown as it is
   caught with the alert's detector, score and reason;
5. the metrics the agent exported are shown, and everything is removed again (also on
   Ctrl-C or SIGTERM).

Exit status 0 when every simulation was caught and the known agent raised nothing, 1 when
not, 2 when this machine cannot run the demo (the message says why).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab import attacks
from lab.agent_process import AgentProcess, AgentStartError
from lab.sandbox import Sandbox, SandboxError

NODE = "demo-node-0"
HOSTS = 20
HISTORY_DAYS = 3.0
# Enough calls that a new name is clearly rare even on a machine where other programs call
# metadata addresses in their own namespaces meanwhile (the probe sees every namespace).
HISTORY_EVENTS = 30_000
ALERT_WAIT = 10.0
# The mock's answers wait this long, as a loaded service's do.
ANSWER_DELAY = 0.3
KNOWN_WAIT = 3.0
KNOWN_AGENT = "/usr/bin/amazon-ssm-agent"

# The process name as the kernel reports it (comm: 15 bytes).
KNOWN_NAME = "amazon-ssm-agen"
# The fleet's usual callers: (weight, name, executable, user, parent), names as comm.
HISTORY_CALLERS = (
    (60, KNOWN_NAME, KNOWN_AGENT, "root", "systemd"),
    (25, "ssm-agent-worke", "/usr/bin/ssm-agent-worker", "root", KNOWN_NAME),
    (10, "aws-k8s-agent", "/app/aws-k8s-agent", "root", "aws-vpc-cni"),
    (5, "cloud-init", "/usr/bin/cloud-init", "root", "systemd"),
)

CONFIG = """\
# Written by `imdswatch demo`.
[scoring]
# Every simulation alerts on its own: in production the same caller alerts once an hour.
suppression_window = "0s"

[agent]
kubernetes = "off"
summary_interval = "15s"
state_save_interval = "1h"
"""


class DemoError(RuntimeError):
    """The demo cannot run here; the message says why and what to do."""


def write_history(path: Path, end: float) -> int:
    """Synthetic ECS events: the usual callers on `HOSTS` nodes over `HISTORY_DAYS` up to
    `end`. Deterministic (no randomness), so every demo starts from the same model."""
    start = end - HISTORY_DAYS * 86400
    step = (end - start) / HISTORY_EVENTS
    cycle = [c for c in HISTORY_CALLERS for _ in range(c[0])]
    with path.open("w") as fh:
        for i in range(HISTORY_EVENTS):
            _, name, exe, user, parent = cycle[(i * 7) % len(cycle)]
            fh.write(json.dumps({
                "@timestamp": start + i * step,
                "destination": {"ip": attacks.IMDS, "port": 80},
                "process": {"name": name, "executable": exe, "parent": {"name": parent}},
                "user": {"name": user, "id": "0"},
                "host": {"name": f"demo-node-{i % HOSTS}"},
            }) + "\n")
    return HISTORY_EVENTS


def warm_state(history: Path, state: Path) -> Any:
    """Replay the history into a model (the replay machinery, as `imdswatch replay --state`
    does) and save it for the agent."""
    from imdswatch.replay import replay
    from scoring.scorer import Scorer
    from scoring.state import save_state

    scorer = Scorer()
    replay(str(history), scorer, lambda _out: None)
    save_state(str(state), scorer)
    return scorer


def _ts(alert: dict) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(alert["@timestamp"].replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        return 0.0


def matching_alerts(alerts: list[dict], process: str, address: str, since: float,
                    pid: int | None) -> list[dict]:
    """Alerts for `process` calling `address` since `since`, from the process the demo
    started (`pid`: the caller or its parent), never from another program on the machine."""
    found = []
    for a in alerts:
        proc = a.get("process", {})
        if proc.get("name") != process or a.get("destination", {}).get("ip") != address:
            continue
        if pid is not None and pid not in (proc.get("pid"), proc.get("parent", {}).get("pid")):
            continue
        if _ts(a) >= since - 1.0:
            found.append(a)
    return found


def wait_for_alert(agent: AgentProcess, process: str, address: str, since: float,
                   pid: int | None, timeout: float = ALERT_WAIT) -> dict | None:
    deadline = time.monotonic() + timeout
    while True:
        found = matching_alerts(agent.alert_lines(), process, address, since, pid)
        if found:
            return found[0]
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def describe_alert(alert: dict) -> list[str]:
    an = alert.get("anomaly", {})
    proc = alert.get("process", {})
    user = alert.get("user", {}).get("name") or alert.get("user", {}).get("id") or "?"
    lines = [f"{an.get('detector')} {an.get('score')} ({an.get('severity', '')}): "
             f"{an.get('reason')}",
             f"process {proc.get('name')} pid {proc.get('pid')} exe {proc.get('executable')} "
             f"user {user} parent {proc.get('parent', {}).get('name')}"]
    req = alert.get("http", {}).get("request", {})
    url = alert.get("url", {})
    if req or url:  # request capture, when the probe sees HTTP requests
        query = f"?{url['query']}" if url.get("query") else ""
        request = alert.get("imdswatch", {}).get("request", {})
        guarded = request.get("guarded")
        facts = [f"class {request['class']}"] if request.get("class") else []
        if guarded is not None:
            facts.append("anti-SSRF header " + ("sent" if guarded else "missing"))
        lines.append(f"request {req.get('method', '?')} {url.get('path', '?')}{query}"
                     + (f" ({', '.join(facts)})" if facts else ""))
    if proc.get("command_line"):
        lines.append(f"command line {proc['command_line'][:150]}")
    return lines


def known_agent_argv(sandbox: Sandbox, workdir: Path) -> list[str]:
    """The SSM agent's stand-in at its packaged path: a private mount namespace overlays
    /usr/bin with one extra file (a copy of curl named amazon-ssm-agent); the host's /usr/bin
    is not touched. Started by a parent named systemd, as the real one is."""
    upper, work = workdir / "overlay-upper", workdir / "overlay-work"
    upper.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    curl = shutil.which("curl")
    if curl is None:
        raise DemoError("needs curl (apt-get install curl)")
    shutil.copy(curl, upper / "amazon-ssm-agent")
    script = (f"mount -t overlay overlay -o lowerdir=/usr/bin,upperdir={upper},"
              f"workdir={work} /usr/bin && exec \"$@\"")
    return sandbox.argv([
        "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
        "python3", "-c", attacks.LAUNCH_AS_SERVICE, KNOWN_AGENT, "-s", "-m", "5",
        f"http://{attacks.IMDS}/latest/meta-data/instance-id"])


METRICS_SHOWN = ("imdswatch_anomalies_total", "imdswatch_learning ", "imdswatch_probe_info",
                 "imdswatch_alerts_held_back")


class Demo:
    def __init__(self, out: Callable[[str], None] = print, keep: bool = False) -> None:
        self.say = out
        self.keep = keep
        self.caught = 0
        self.missed: list[str] = []
        self.known_alerted = False

    def check_machine(self) -> None:
        from tracer import doctor

        if os.geteuid() != 0:
            raise DemoError("needs root (BPF and network namespaces): sudo make demo")
        for tool in ("ip", "unshare", "mount", "curl", "python3"):
            if shutil.which(tool) is None:
                raise DemoError(f"needs `{tool}` (make setup installs what is missing)")
        problems = doctor.preflight("auto", None)
        if problems:
            raise DemoError("this machine cannot trace: " + "; ".join(problems))

    def run(self) -> int:
        t_start = time.monotonic()
        say = self.say
        self.check_machine()
        workdir = Path(tempfile.mkdtemp(prefix="imdswatch-demo-"))
        sandbox: Sandbox | None = None
        agent: AgentProcess | None = None
        try:
            say("imdswatch demo: everything below happens in a private network namespace "
                "with a mock metadata service; no real metadata service is contacted.")
            sandbox = Sandbox(prefix="imdsw-demo", delay=ANSWER_DELAY).__enter__()
            say(f"[1/5] sandbox: network namespace {sandbox.name}: "
                f"{', '.join(sandbox.addresses)} on its loopback, served by a mock IMDS "
                "(IMDSv1, IMDSv2, role credentials) and AWS ECS credentials endpoint")
            history, state, config = (workdir / "history.ndjson", workdir / "state.json.gz",
                                      workdir / "imdswatch.toml")
            n = write_history(history, time.time() - 60)
            scorer = warm_state(history, state)
            config.write_text(CONFIG)
            callers = ", ".join(sorted({c[1] for c in HISTORY_CALLERS}))
            say(f"[2/5] history: {n} synthetic metadata calls over {HISTORY_DAYS:.0f} days on "
                f"{HOSTS} nodes ({callers}) replayed into a model: learning "
                f"{'still on' if scorer.learning else 'done'}, so alerts are on from the start")
            agent = AgentProcess(workdir, "--config", str(config), "--state", str(state),
                                 env={"NODE_NAME": NODE}, own_session=True)
            say(f"[3/5] agent: {' '.join(['imdswatch', *agent.argv[3:]])}")
            try:
                took = agent.start(120.0).ready_after
            except AgentStartError as exc:
                raise DemoError(str(exc)) from None
            probe = next((x.split("probe ", 1)[1].split(",")[0]
                          for x in agent.log_lines("agent ready: probe")), "?")
            say(f"      ready in {took:.1f}s: probe {probe}, metrics on "
                f"http://127.0.0.1:{agent.port}/metrics")
            for line in agent.log_lines("learning: "):
                say("      agent log: " + line.split(": ", 1)[1][:160])
            say("[4/5] metadata calls:")
            self.known_agent(agent, sandbox, workdir)
            for sim in attacks.SIMULATIONS:
                self.attack(agent, sandbox, workdir, sim)
            say(f"[5/5] metrics: http://127.0.0.1:{agent.port}/metrics "
                "(Prometheus format; alert lines were written to "
                f"{agent.alerts})")
            self.show_metrics(agent)
            total = len(attacks.SIMULATIONS)
            ok = self.caught == total and not self.known_alerted
            say(f"result: {self.caught} of {total} attack simulations caught, "
                f"{'an alert' if self.known_alerted else 'no alert'} for the known agent, "
                f"in {time.monotonic() - t_start:.0f}s"
                + (f"; missed: {', '.join(self.missed)}" if self.missed else ""))
            if self.keep:
                say("the agent keeps running (--keep): explore the metrics above, "
                    "Ctrl-C to stop and clean up")
                while agent.proc is not None and agent.proc.poll() is None:
                    time.sleep(0.5)
            return 0 if ok else 1
        finally:
            if agent is not None:
                agent.stop()
            if sandbox is not None:
                sandbox.close()
            shutil.rmtree(workdir, ignore_errors=True)
            say(f"cleaned up: agent stopped, namespace removed, {workdir} deleted")

    def known_agent(self, agent: AgentProcess, sandbox: Sandbox, workdir: Path) -> None:
        selector = f'process="{KNOWN_NAME}"'
        seen_before = _metric(agent, "imdswatch_metadata_connections_total", selector)
        known = attacks.Simulation("known-agent", "known agent", KNOWN_NAME, attacks.IMDS, (),
                                lambda t, w: [])
        ran = attacks.run_argv(known, known_agent_argv(sandbox, workdir))
        time.sleep(KNOWN_WAIT)
        alerts = matching_alerts(agent.alert_lines(), KNOWN_NAME, attacks.IMDS, ran.started,
                                 ran.pid)
        seen = _metric(agent, "imdswatch_metadata_connections_total", selector) - seen_before
        self.known_alerted = bool(alerts)
        verdict = "ALERT" if alerts else "quiet"
        self.say(f"  {verdict:8} the known agent: amazon-ssm-agent at {KNOWN_AGENT}, started "
                 f"by systemd, asks for its instance id ({ran.note}); scored, no alert "
                 f"(calls counted: {seen:.0f})" if not alerts else
                 f"  {verdict:8} the known agent alerted, which it should not have:")
        for a in alerts:
            for line in describe_alert(a):
                self.say("             " + line)

    def attack(self, agent: AgentProcess, sandbox: Sandbox, workdir: Path,
               sim: attacks.Simulation) -> None:
        ran = attacks.run(sim, attacks.SANDBOX, workdir, sandbox.argv)
        if ran.status is None and ran.note.startswith("skipped"):
            self.missed.append(sim.key)
            self.say(f"  {'SKIPPED':8} {sim.title}: {ran.note}")
            return
        alert = wait_for_alert(agent, sim.process, sim.address, ran.started, ran.pid)
        if alert is None:
            self.missed.append(sim.key)
            self.say(f"  {'MISSED':8} {sim.title} ({sim.detail}; {ran.note}): no alert "
                     f"within {ALERT_WAIT:.0f}s")
            return
        self.caught += 1
        delay = max(0.0, _ts(alert) - ran.started)
        self.say(f"  {'CAUGHT':8} {sim.title} ({sim.detail}), alert {delay:.1f}s after "
                 "the start")
        for line in describe_alert(alert):
            self.say("             " + line)

    def show_metrics(self, agent: AgentProcess) -> None:
        _, text = agent.get("/metrics")
        ours = {f'process="{s.process}"' for s in attacks.SIMULATIONS} | {f'process="{KNOWN_NAME}"'}
        for line in text.splitlines():
            if line.startswith(METRICS_SHOWN) or (
                    line.startswith("imdswatch_metadata_connections_total{")
                    and f'host="{NODE}"' in line and any(p in line for p in ours)):
                self.say("      " + line)


def _metric(agent: AgentProcess, name: str, selector: str) -> float:
    total = 0.0
    for line in agent.get("/metrics")[1].splitlines():
        if line.startswith(name + "{") and selector in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def run_demo(keep: bool = False) -> int:
    """`imdswatch demo`: returns the exit status."""
    interrupted: list[int] = []

    def on_term(signum: int, _frame: object) -> None:
        interrupted.append(signum)
        raise KeyboardInterrupt

    def say(text: str) -> None:
        print(text, flush=True)
        # The signal's exception is lost when it lands where Python ignores exceptions (a
        # __del__ closing an HTTP response): the next line said raises it again, and the
        # demo's last line is said after its clean-up, so an interrupt always ends in 130.
        if interrupted:
            raise KeyboardInterrupt

    # Ctrl-C too, explicitly: a process started with SIGINT ignored (a background job of a
    # non-interactive shell, as some CI runners start it) keeps it ignored in Python, and
    # the demo would then neither stop nor clean up.
    previous = {s: signal.signal(s, on_term) for s in (signal.SIGTERM, signal.SIGINT)}
    demo = Demo(say, keep=keep)
    try:
        return demo.run()
    except (DemoError, SandboxError) as exc:
        print(f"imdswatch demo: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("imdswatch demo: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
