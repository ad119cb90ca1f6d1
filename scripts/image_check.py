"""`make test-image`'s runtime half: the built image run exactly as the DaemonSet runs it
(flags derived from deploy/kubernetes/base/daemonset.yaml by scripts/daemonset_podman.py),
checked from outside as a kubelet and an operator would: doctor, liveness and readiness, a
connect from a private network namespace seen and alerted, the metrics, SIGTERM within the
grace period, and the learnt state surviving a restart. Then the same image as the fleet
scorer, run as its Deployment runs it (deploy/kubernetes/components/fleet): an event batch
posted from the host over loopback with the bearer token, the alert, SIGTERM. Then the
agent with the enforcement components' patches: audit with the shipped example policy (a
user-data request is a would_deny line), and deny in a cgroup of this script's own (a pod-
named cgroup's curl refused, wget allowed, a host-named cgroup's curl out of scope). One
line per step with its time.

    .venv/bin/python scripts/image_check.py IMAGE
SAFETY: the only metadata traffic is a curl (or wget) inside this script's own network
namespace, to its own mock IMDS on that namespace's loopback. Enforcement is linked only
to a cgroup this script creates, holding only its own clients, removed at the end.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]

import yaml  # noqa: E402
from daemonset_podman import DAEMONSET, SERVE_DEPLOYMENT, translate  # noqa: E402
from fleet_fixtures import post  # noqa: E402
from test_compiled import setup_list  # noqa: E402
from test_deploy_manifests import json_patch  # noqa: E402

from lab.agent_process import free_port  # noqa: E402
from lab.cgroups import remove_cgroups  # noqa: E402
from lab.history import warm_state  # noqa: E402
from lab.sandbox import Sandbox as MetadataNamespace  # noqa: E402
from lab.wait import wait_for  # noqa: E402

ENFORCEMENT = ROOT / "deploy" / "kubernetes" / "components" / "enforcement"
ENFORCEMENT_DENY = ROOT / "deploy" / "kubernetes" / "components" / "enforcement-deny"
COMPILED_MODULES = [p.removesuffix(".py").replace("/", ".") for p in setup_list()]

IMDS = "169.254.169.254"
NODE = "imdswatch-image-node"
# Hints that exist only in a source checkout: inside the image they would mislead.
CHECKOUT_HINTS = re.compile(r"\.venv|setcap|scripts/|make setup")
START_TIMEOUT = 240.0


class CheckFailed(AssertionError):
    pass


def check(cond: object, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


def podman(*args: str, timeout: float = 300, check_rc: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check_rc and r.returncode != 0:
        raise CheckFailed(f"podman {' '.join(args[:3])}... exited {r.returncode}: "
                          f"{r.stderr.strip()[-1500:]}")
    return r


class Container:
    """One run of the image with the DaemonSet's flags; its port published on loopback."""

    def __init__(self, image: str, flags: list[str], args: list[str], port: int,
                 more_ports: tuple[int, ...] = ()) -> None:
        self.name = f"imdswatch-image-test-{secrets.token_hex(4)}"
        self.host_port = free_port()
        # Further container ports, each published on its own loopback port.
        self.host_ports = {p: free_port() for p in more_ports}
        self.image, self.flags, self.args, self.port = image, flags, args, port

    def start(self) -> None:
        more = [f"--publish=127.0.0.1:{h}:{p}" for p, h in self.host_ports.items()]
        podman("run", "--detach", "--name", self.name,
               f"--publish=127.0.0.1:{self.host_port}:{self.port}", *more, *self.flags,
               self.image, *self.args)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.host_port}{path}",
                                        timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except OSError:
            return 0, ""

    def running(self) -> bool:
        r = podman("inspect", "--format", "{{.State.Running}}", self.name, check_rc=False)
        return r.stdout.strip() == "true"

    def logs(self) -> tuple[str, str]:
        r = podman("logs", self.name, check_rc=False)
        return r.stdout, r.stderr

    def alerts(self) -> list[dict]:
        out = []
        for line in self.logs()[0].splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for line in self.get("/metrics")[1].splitlines():
            head, _, value = line.rpartition(" ")
            metric, _, lab = head.partition("{")
            if metric == name and all(f'{k}="{v}"' in lab for k, v in labels.items()):
                total += float(value)
        return total

    def exit_code(self) -> int:
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout)

    def remove(self) -> None:
        podman("rm", "--force", "--time=5", self.name, check_rc=False)


def run_steps(steps: list[tuple[str, Callable[[], str]]]) -> bool:
    ok = True
    for name, step in steps:
        t0 = time.monotonic()
        try:
            detail = step()
            status = "pass"
        except (CheckFailed, subprocess.TimeoutExpired) as exc:
            detail, status, ok = str(exc), "FAIL", False
        print(f"  {name:<34} {status}  {detail} ({time.monotonic() - t0:.1f}s)", flush=True)
        if not ok:
            break
    return ok


def main() -> int:
    image = sys.argv[1]
    state_dir = Path(tempfile.mkdtemp(prefix="imdswatch-image-state-"))
    state_dir.chmod(0o755)  # as kubelet creates a DirectoryOrCreate hostPath
    spec = translate(yaml.safe_load(DAEMONSET.read_text()), str(state_dir), NODE)
    state_file = state_dir / Path(next(a for a in spec.args if a.startswith("--state="))
                                  .split("=", 1)[1]).name
    ready_path = spec.probes["readinessProbe"]
    live_path = spec.probes["livenessProbe"]
    ctx: dict[str, object] = {}
    containers: list[Container] = []

    def new_container() -> Container:
        c = Container(image, spec.run, spec.args, spec.port)
        containers.append(c)
        return c

    def doctor_unprivileged() -> str:
        # The image's own user with the DaemonSet's mounts: what an operator sees running
        # `doctor` without the securityContext. tracefs is mounted there, only unreadable.
        flags = [f for f in spec.run if not f.startswith(("--user=", "--cap-add="))]
        r = podman("run", "--rm", "--user=10001", *flags, image, "doctor", check_rc=False)
        out = r.stdout + r.stderr
        check(r.returncode == 1, f"doctor exited {r.returncode} without privileges:\n{out}")
        check("[FAIL] privileges: uid 10001" in out, f"no privileges failure:\n{out}")
        check("tracefs: mounted at" in out and "not readable by uid 10001" in out,
              f"tracefs reported as missing rather than unreadable:\n{out}")
        bad = CHECKOUT_HINTS.findall(out)
        check(not bad, f"hints that do not exist in the image ({bad}):\n{out}")
        return "privileges and tracefs named, fixes fit a container"

    def doctor_as_daemonset() -> str:
        r = podman("run", "--rm", *spec.run, image, "doctor", check_rc=False)
        out = r.stdout + r.stderr
        check(r.returncode == 0, f"doctor exited {r.returncode}:\n{out}")
        check("[FAIL]" not in out, f"doctor failures:\n{out}")
        bad = CHECKOUT_HINTS.findall(out)
        check(not bad, f"hints that do not exist in the image ({bad}):\n{out}")
        m = re.search(r"probe: auto picks (\w+)", out)
        check(m, f"doctor named no probe:\n{out}")
        ctx["mode"] = m.group(1)
        return f"every check passes or warns with a fix; auto picks {m.group(1)}"

    def start_ready() -> str:
        warm_state(state_file)  # a model warmed by replay, as the contract's flow has it
        c = new_container()
        t0 = time.monotonic()
        c.start()
        check(wait_for(lambda: c.get(live_path)[0] == 200 or not c.running(), 60, 0.2)
              and c.running(), f"{live_path} never answered: {c.logs()[1][-2000:]}")
        live_after = time.monotonic() - t0
        check(wait_for(lambda: c.get(ready_path)[0] == 200 or not c.running(),
                       START_TIMEOUT, 0.5) and c.running(),
              f"{ready_path} never 200: {c.logs()[1][-2000:]}")
        ctx["c"] = c
        return (f"{live_path} after {live_after:.1f}s, {ready_path} after "
                f"{time.monotonic() - t0:.1f}s")

    def connect_alerted() -> str:
        c = ctx["c"]
        with MetadataNamespace(v4=(IMDS,), v6=()) as ns:
            p = ns.popen(["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/latest/meta-data/"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            p.wait(30)

        def mine() -> list[dict]:
            return [a for a in c.alerts() if a.get("process", {}).get("pid") == p.pid]

        check(wait_for(mine, 20, 0.5), f"no alert for curl pid {p.pid}: "
              f"{c.logs()[0][-1500:]} {c.logs()[1][-1500:]}")
        (alert,) = mine()
        check(alert["process"]["name"] == "curl", alert)
        check(alert["destination"]["ip"] == IMDS, alert)
        check(alert.get("host", {}).get("name") == NODE, f"host.name is not the node: {alert}")
        ctx["pid"] = p.pid
        return f"curl pid {p.pid} alerted, score {alert['anomaly']['score']:.0f}, " \
               f"host.name {NODE}"

    def metrics() -> str:
        c = ctx["c"]
        check(wait_for(lambda: c.metric("imdswatch_metadata_connections_total",
                                        process="curl") >= 1, 10),
              "imdswatch_metadata_connections_total{process=curl} not counted")
        mode = str(ctx["mode"])
        check(c.metric("imdswatch_probe_info", mode=mode) == 1, f"probe_info not {mode}")
        check(c.metric("imdswatch_anomalies_total") >= 1, "no anomaly counted")
        check(c.metric("imdswatch_ready") == 1, "imdswatch_ready is not 1")
        check(c.metric("imdswatch_kernel_events_dropped_total") == 0, "events dropped")
        # The DaemonSet drops CAP_SYSLOG: the identity reads must still load (bpf/imdswatch.h).
        check(c.metric("imdswatch_kernel_identity_enabled") == 1,
              f"kernel-side identity off: {c.logs()[1][-1500:]}")
        return f"connections, anomalies, probe_info{{mode={mode}}}, ready, kernel identity"

    def sigterm() -> str:
        c = ctx["c"]
        before = state_file.stat().st_mtime_ns
        t0 = time.monotonic()
        podman("stop", f"--time={spec.grace}", c.name, timeout=spec.grace + 60)
        took = time.monotonic() - t0
        rc = c.exit_code()
        err = c.logs()[1]
        check(rc == 0, f"exit status {rc} after SIGTERM: {err[-2000:]}")
        check(took < spec.grace, f"took {took:.1f}s, past the {spec.grace}s grace period")
        check("SIGTERM received" in err, f"no SIGTERM in the log: {err[-1500:]}")
        check("state was not saved" not in err and "cannot save state" not in err,
              err[-1500:])
        check(state_file.stat().st_mtime_ns != before, "the state file was not rewritten")
        return f"exit 0 in {took:.1f}s, state saved"

    def restart() -> str:
        c = new_container()
        c.start()
        check(wait_for(lambda: c.get(ready_path)[0] == 200 or not c.running(),
                       START_TIMEOUT, 0.5) and c.running(),
              f"not ready after restart: {c.logs()[1][-2000:]}")
        m = re.search(r"state loaded from \S+ \((\d+) events learned\)", c.logs()[1])
        check(m, f"the restarted agent did not load the state: {c.logs()[1][-1500:]}")
        learned = int(m.group(1))
        check(learned >= 3001, f"{learned} events learned: the curl before the restart is lost")
        check(c.metric("imdswatch_learning") == 0, "restarted agent went back to learning")
        podman("stop", f"--time={spec.grace}", c.name, timeout=spec.grace + 60)
        check(c.exit_code() == 0, f"exit {c.exit_code()} at the second stop")
        return f"state loaded with {learned} events (3000 warmed + the live curl), no " \
               "learning period"

    def fleet_scorer() -> str:
        deployment = yaml.safe_load(SERVE_DEPLOYMENT.read_text())
        pod = deployment["spec"]["template"]["spec"]
        fs_group = int(pod["securityContext"]["fsGroup"])
        base = Path(tempfile.mkdtemp(prefix="imdswatch-image-serve-"))
        ctx["serve_dir"] = base
        base.chmod(0o755)
        claim, secret = base / "claim", base / "secret"
        claim.mkdir()
        secret.mkdir(mode=0o755)
        # What the kubelet does: the claim's root group-owned by fsGroup and group-writable,
        # the Secret's key with its defaultMode and fsGroup as its group.
        token = secrets.token_hex(16)
        (secret / "token").write_text(token)
        mode = next(v["secret"].get("defaultMode", 0o644) for v in pod["volumes"]
                    if "secret" in v)
        (secret / "token").chmod(mode)
        shutil.chown(secret / "token", group=fs_group)
        sspec = translate(deployment, str(claim), NODE, {"fleet-token": str(secret)})
        state = claim / Path(next(a for a in sspec.args if a.startswith("--state="))
                             .split("=", 1)[1]).name
        warm_state(state)  # the fleet's history: curl has never called on any node
        for path in (claim, state):
            shutil.chown(path, group=fs_group)
        claim.chmod(0o2775)
        state.chmod(0o664)
        ingest = sspec.ports["ingest"]
        c = Container(image, sspec.run, sspec.args, sspec.port, (ingest,))
        containers.append(c)
        c.start()
        check(wait_for(lambda: c.get(sspec.probes["readinessProbe"])[0] == 200
                       or not c.running(), START_TIMEOUT, 0.5) and c.running(),
              f"serve never ready: {c.logs()[1][-2000:]}")
        url = f"http://127.0.0.1:{c.host_ports[ingest]}"
        event = {"@timestamp": time.time(), "event": {"id": f"image-{secrets.token_hex(6)}"},
                 "destination": {"ip": IMDS, "port": 80},
                 "process": {"name": "curl", "pid": 4242, "executable": "/usr/bin/curl",
                             "parent": {"name": "bash"}},
                 "user": {"name": "www-data", "id": "33"}, "host": {"name": "node-3"}}
        body = json.dumps(event).encode()
        status, _h, _b = post(url, body, None)
        check(status == 401, f"a batch without the token got {status}, not 401")
        status, _h, answer = post(url, body, token)
        check(status == 200 and json.loads(answer).get("accepted") == 1,
              f"the batch got {status} {answer[:300]!r}")

        def mine() -> list[dict]:
            return [a for a in c.alerts()
                    if a.get("event", {}).get("id") == event["event"]["id"]]

        check(wait_for(mine, 20, 0.5), f"serve did not alert: {c.logs()[1][-1500:]}")
        (alert,) = mine()
        check(alert["imdswatch"]["scored_by"] == "fleet", alert)
        check(token not in "".join(c.logs()), "the token reached serve's output")
        podman("stop", f"--time={sspec.grace}", c.name, timeout=sspec.grace + 60)
        check(c.exit_code() == 0, f"serve exited {c.exit_code()}: {c.logs()[1][-1500:]}")
        return (f"as uid {pod['securityContext']['runAsUser']} without capabilities: 401 "
                f"without the token, alert {alert['anomaly']['detector']} "
                f"{alert['anomaly']['score']:.0f} for the posted curl, SIGTERM exit 0")

    def bus_client() -> str:
        # serve --bus in the image against a real nats-server on this host (the example
        # config's users): the NATS client and its nkeys library are there, the password
        # comes from a file and never reaches the output.
        from nats_fixtures import SERVE_PASSWORD, SERVE_USER, with_example_auth

        from lab.nats_server import NatsServer, NatsUnavailable

        base = Path(tempfile.mkdtemp(prefix="imdswatch-image-bus-"))
        base.chmod(0o755)  # the image's user reads the credentials file in it
        ctx["bus_dir"] = base
        srv = with_example_auth(NatsServer(base, "n1"))
        try:
            srv.start()
        except NatsUnavailable as exc:
            raise CheckFailed(str(exc)) from None
        try:
            r = podman("run", "--rm", "--entrypoint=/opt/imdswatch/bin/python", image, "-c",
                       "import nats, nkeys; print(nkeys.from_seed(nkeys.encode_seed("
                       "bytes(32), nkeys.PREFIX_BYTE_USER)).public_key.decode()[:1])")
            check(r.stdout.strip() == "U", f"nats-py/nkeys unusable: {r.stderr[-800:]}")
            (base / "creds").write_text(f"{SERVE_USER}:{SERVE_PASSWORD}\n")
            (base / "creds").chmod(0o644)
            c = Container(image, ["--network=host", f"--volume={base}:/bus:ro"],
                          ["serve", f"--bus={srv.url}", "--bus-creds=/bus/creds",
                           "--replica-id=image", "--state=/tmp/state.json",
                           f"--listen=127.0.0.1:{free_port()}",
                           f"--metrics-address=127.0.0.1:{free_port()}"], 0)
            containers.append(c)
            podman("run", "--detach", "--name", c.name, *c.flags, image, *c.args)
            check(wait_for(lambda: "now holds the scoring lease" in c.logs()[1]
                           or not c.running(), 60, 0.5) and c.running(),
                  f"serve --bus did not start scoring: {c.logs()[1][-1500:]}")
            podman("stop", "--time=30", c.name, timeout=90)
            check(c.exit_code() == 0, f"serve --bus exited {c.exit_code()}")
            check(SERVE_PASSWORD not in "".join(c.logs()), "the NATS password was logged")
        finally:
            srv.stop()
        return "nats-py and nkeys import; serve --bus on a real nats-server, SIGTERM exit 0"

    enforce_dirs: list[Path] = []

    def enforcing_container(*patches: Path, policy: str, args: list[str]) -> Container:
        """The DaemonSet with the enforcement components' patches applied, its policy
        ConfigMap and break-glass hostPath in directories of this test's own."""
        ds = yaml.safe_load(DAEMONSET.read_text())
        for patch in patches:
            json_patch(ds, yaml.safe_load(patch.read_text()))
        base = Path(tempfile.mkdtemp(prefix="imdswatch-image-enforce-"))
        enforce_dirs.append(base)
        base.chmod(0o755)
        for d in ("policy", "run", "state"):
            (base / d).mkdir(mode=0o755)
        (base / "policy" / "policy.toml").write_text(policy)
        (base / "policy" / "policy.toml").chmod(0o644)
        espec = translate(ds, str(base / "state"), NODE, {"policy": str(base / "policy")},
                          {"break-glass": str(base / "run")})
        c = Container(image, espec.run, espec.args + args, espec.port)
        containers.append(c)
        c.start()
        check(wait_for(lambda: c.get(ready_path)[0] == 200 or not c.running(),
                       START_TIMEOUT, 0.5) and c.running(),
              f"not ready: {c.logs()[1][-2000:]}")
        return c

    def enforcement_audit() -> str:
        # components/enforcement as shipped: audit with its example policy (no user-data).
        policy = (ENFORCEMENT / "policy.toml").read_text()
        c = enforcing_container(ENFORCEMENT / "daemonset-enforce-patch.yaml", policy=policy,
                                args=["--learning-period=0s"])
        with MetadataNamespace(v4=(IMDS,), v6=()) as ns:
            p = ns.popen(["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/latest/user-data"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rc = p.wait(30)
        check(rc == 0, f"curl exited {rc} in audit: audit must touch nothing")

        def mine() -> list[dict]:
            return [a for a in c.alerts() if a.get("process", {}).get("pid") == p.pid
                    and a.get("event", {}).get("action") == "would_deny"]

        check(wait_for(mine, 20, 0.5), f"no would_deny line for curl pid {p.pid}: "
              f"{c.logs()[0][-1500:]} {c.logs()[1][-1500:]}")
        rule = mine()[0]["imdswatch"]["policy"]["rule"]
        check(rule == "no-user-data", f"decided by {rule}")
        check(c.metric("imdswatch_enforcement_mode", mode="audit") == 1, "mode is not audit")
        podman("stop", f"--time={spec.grace}", c.name, timeout=spec.grace + 60)
        check(c.exit_code() == 0, f"exit {c.exit_code()}: {c.logs()[1][-1500:]}")
        return f"curl of user-data (pid {p.pid}) connected and is a would_deny line (rule {rule})"

    def enforcement_deny() -> str:
        # components/enforcement-deny: deny, pods only; its cgroup (the host's kubepods)
        # replaced by one of this test's own holding a pod-named and a host-named cgroup.
        from tracer.cgroup_attach import cgroup2_root

        top = Path(cgroup2_root()) / f"imdsw-image-enforce-{secrets.token_hex(4)}"
        pod = top / "kubepods-besteffort-pod0f6c1f8e_8d0b_4b8e_9a39_6c3c1a1e0a01.slice" / \
            f"cri-containerd-{'a1' * 32}.scope"
        host = top / "host.scope"
        ctx["cgroups"] = [pod, pod.parent, host, top]
        pod.mkdir(parents=True)
        host.mkdir()
        policy = '[policy]\ndefault = "deny"\n\n[[rule]]\nname = "wget"\n' \
                 'executable = "/usr/bin/wget"\n'
        c = enforcing_container(ENFORCEMENT / "daemonset-enforce-patch.yaml",
                                ENFORCEMENT_DENY / "daemonset-deny-patch.yaml", policy=policy,
                                args=[f"--enforce-cgroup=/host{top}", "--learning-period=0s"])
        check(wait_for(lambda: c.metric("imdswatch_enforcement_mode", mode="deny") == 1, 20),
              f"never armed: {c.logs()[1][-2000:]}")

        def client(argv: list[str], cgroup: Path) -> tuple[int, int, str]:
            procs = cgroup / "cgroup.procs"
            with MetadataNamespace(v4=(IMDS,), v6=()) as ns:
                p = ns.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: procs.write_text(str(os.getpid())))
                _, err = p.communicate(timeout=30)
            return p.pid, p.returncode, err

        curl = ["env", "LC_ALL=C", "curl", "-v", "-o", "/dev/null", "--max-time", "5",
                f"http://{IMDS}/latest/meta-data/instance-id"]
        wget = ["wget", "-q", "-O", "/dev/null", f"http://{IMDS}/latest/meta-data/instance-id"]
        # In scope once the agent's scan (every second) has listed the pod's cgroup.
        check(wait_for(lambda: client(curl, pod)[1] == 7, 20, 0.5),
              f"curl in the pod's cgroup never refused: {c.logs()[1][-2000:]}")
        _, rc, err = client(curl, pod)
        check(rc == 7 and "Operation not permitted" in err, f"curl: {rc} {err[-500:]}")
        _, rc, err = client(wget, pod)
        check(rc == 0, f"wget (allowed) exited {rc}: {err[-500:]}")
        _, rc, err = client(curl, host)
        check(rc == 0, f"curl out of scope (a host process) exited {rc}: {err[-500:]}")
        check(wait_for(lambda: [a for a in c.alerts()
                                if a.get("event", {}).get("action") == "connection_denied"],
                       10, 0.5), f"no connection_denied line: {c.logs()[0][-1500:]}")
        podman("stop", f"--time={spec.grace}", c.name, timeout=spec.grace + 60)
        check(c.exit_code() == 0, f"exit {c.exit_code()}: {c.logs()[1][-1500:]}")
        _, rc, err = client(curl, pod)
        check(rc == 0, f"curl still refused after the agent stopped: {rc} {err[-300:]}")
        return "curl in a pod cgroup EPERM, wget there allowed, curl in a host cgroup " \
               "allowed (out of scope), connection_denied line; stopped: nothing denied"

    def compiled() -> str:
        # The hot path as `make bench` measures it: mypyc's builds, not the sources.
        code = ("import importlib; print(' '.join(importlib.import_module(m).__file__ "
                f"for m in {COMPILED_MODULES!r}))")
        r = podman("run", "--rm", "--entrypoint=/opt/imdswatch/bin/python", image, "-c", code)
        files = r.stdout.split()
        check(len(files) == len(COMPILED_MODULES) and all(f.endswith(".so") for f in files),
              f"modules not compiled in the image: {r.stdout}{r.stderr}")
        return f"{len(files)} modules compiled"

    steps = [
        ("hot path compiled", compiled),
        ("doctor without privileges", doctor_unprivileged),
        ("doctor as the DaemonSet runs it", doctor_as_daemonset),
        ("start: liveness, readiness", start_ready),
        ("connect from a private netns", connect_alerted),
        ("metrics", metrics),
        ("SIGTERM", sigterm),
        ("restart keeps the state", restart),
        ("fleet scorer (serve Deployment)", fleet_scorer),
        ("fleet scorer on a bus (serve --bus)", bus_client),
        ("enforcement overlay: audit", enforcement_audit),
        ("enforcement-deny overlay: deny", enforcement_deny),
    ]
    try:
        ok = run_steps(steps)
    finally:
        for c in containers:
            c.remove()
        shutil.rmtree(state_dir, ignore_errors=True)
        for key in ("serve_dir", "bus_dir"):
            if key in ctx:
                shutil.rmtree(str(ctx[key]), ignore_errors=True)
        for d in enforce_dirs:
            shutil.rmtree(d, ignore_errors=True)
        remove_cgroups(ctx.get("cgroups", []))  # type: ignore[arg-type]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
