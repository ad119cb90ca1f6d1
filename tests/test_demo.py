"""`imdswatch demo` end to end, as CI runs it: real agent, real BPF probe, real curl/wget/
python3/bash/nc processes, all inside the demo's own network namespace with its mock
metadata service. The test checks what a newcomer sees and that nothing is left behind.

`imdswatch simulate --target sandbox` is checked alongside; `--target metadata` (the REAL
service) is never run here, only its refusal when not typed explicitly.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns_fixtures import require_bcc

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "imdswatch.cli"]


def netns_names() -> set[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return {line.split()[0] for line in r.stdout.splitlines() if line.strip()}


def netns_inode(name: str) -> int:
    return os.stat(f"/run/netns/{name}").st_ino


def processes_left(ns_inode: int, workdir: str) -> list[int]:
    """Processes still in the demo's namespace (its mock service, a simulation) or running
    with its work directory on their command line (its agent). Other demos or tests may run
    at the same time: only this demo's own namespace and directory count."""
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            in_ns = os.stat(f"/proc/{pid}/ns/net").st_ino == ns_inode
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(pid) != os.getpid() and (in_ns or workdir in cmdline):
            left.append(int(pid))
    return left


def ours(out: str) -> tuple[str, str]:
    """The namespace and work directory this demo run reported."""
    ns = re.search(r"network namespace (imdsw-demo-[0-9a-f]+)", out).group(1)
    workdir = re.search(r"(/tmp/imdswatch-demo-[^/\s]+)", out).group(1)
    return ns, workdir


@pytest.mark.root
@pytest.mark.bpf
def test_demo_catches_every_simulation_and_cleans_up() -> None:
    require_bcc()
    t0 = time.monotonic()
    r = subprocess.run([*CLI, "demo"], capture_output=True, text=True, cwd=ROOT, timeout=240)
    took = time.monotonic() - t0
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "no real metadata service is contacted" in out
    assert "learning done" in out
    assert "learning: done" in out  # the agent's own log line, relayed
    assert re.search(r"quiet +the known agent: amazon-ssm-agent", out)
    caught = re.findall(r"^  CAUGHT +(.+)$", out, re.M)
    assert len(caught) == 8, out
    for what in ("IMDSv1", "IMDSv2 token flow from netcat", "nobody", "urllib", "/dev/tcp",
                 "IPv6", "ECS credentials", "SSM agent started from /tmp"):
        assert any(what in c for c in caught), (what, out)
    # Each catch shows its reason; the masquerade is told apart by its executable.
    assert out.count("rare_") >= 8
    assert re.search(r"rare_executable [0-9.]+ .*otherwise runs from /usr/bin/amazon-ssm-agent",
                     out)
    # With request capture (the probe sees the HTTP request), each catch shows what was
    # asked for; without it the demo works the same, from the connects alone.
    for request in re.findall(r"^ +request (.+)$", out, re.M):
        assert re.match(r"GET /(latest/meta-data/iam/security-credentials/demo-role|"
                        r"v2/credentials/\S+) \(class credentials", request), request
    assert "metrics: http://127.0.0.1:" in out
    assert re.search(r"imdswatch_anomalies_total\{", out)
    assert "result: 8 of 8 attack simulations caught, no alert for the known agent" in out
    assert "cleaned up" in out
    ns, workdir = ours(out)
    assert ns not in netns_names()
    assert not Path(workdir).exists()
    assert processes_left(0, workdir) == []
    print(f"demo took {took:.0f}s")


@pytest.mark.root
@pytest.mark.bpf
def test_demo_cleans_up_on_ctrl_c() -> None:
    require_bcc()
    proc = subprocess.Popen([*CLI, "demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    # Interrupt once the agent is starting: the namespace, the agent and the mock service
    # exist by then.
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[3/5]"):
            break
    ns, workdir = ours("".join(lines))
    assert ns in netns_names()
    inode = netns_inode(ns)
    assert processes_left(inode, workdir)  # the mock service and the agent starting
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "cleaned up" in out and "interrupted" in err
    assert ns not in netns_names()
    assert not Path(workdir).exists()
    # No agent, mock service or simulation of this demo survives it.
    assert processes_left(inode, workdir) == []


@pytest.mark.root
def test_simulate_in_the_sandbox_runs_every_simulation() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    r = subprocess.run([*CLI, "simulate"], capture_output=True, text=True, cwd=ROOT,
                       timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "a real one is never contacted" in r.stdout
    ran = re.findall(r"^  ran +(\S+) .*\(exit 0", r.stdout, re.M)
    assert len(ran) == 8, r.stdout
    ns = re.search(r"namespace (imdsw-sim-[0-9a-f]+)", r.stdout).group(1)
    assert ns not in netns_names()


def test_simulate_refuses_the_real_service_unless_typed() -> None:
    from imdswatch.simulate import run_simulate

    # As if --target metadata came from anywhere but the command line: refused, nothing run.
    assert run_simulate("metadata", explicit=False) == 2
    r = subprocess.run([*CLI, "simulate", "--list"], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 8
    r = subprocess.run([*CLI, "simulate", "--only", "nope"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "unknown simulation nope" in r.stderr


def test_simulate_job_manifest() -> None:
    import yaml

    doc = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "simulate-job.yaml").read_text())
    kv = pytest.importorskip("kubernetes_validate")
    kv.validate(doc, kv.latest_version(), strict=True)
    container = doc["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["simulate", "--target", "metadata"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # The arguments are the CLI's own (click parses them; --list runs nothing).
    from click.testing import CliRunner

    from imdswatch.cli import main

    r = CliRunner().invoke(main, [*container["args"], "--list"])
    assert r.exit_code == 0 and "masquerade" in r.output
