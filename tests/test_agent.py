"""`imdswatch run` end to end as a real process: BPF attached, real clients in a private
namespace calling a mock IMDS, alerts NDJSON, scraped Prometheus metrics, state save on
SIGTERM, live config reload on SIGHUP, fail-fast exit 2, per-process kernel counts under a
flood, and pod names from a (fake) Kubernetes API for a client in a pod-shaped cgroup."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.fake_kube import CID_A, IMAGE_A, UID_A, FakeApi
from netns_fixtures import (
    LAB,
    AgentProcess,
    MetadataNamespace,
    require_bcc,
    wait_for,
    warm_state,
)

from lab.cgroups import remove_cgroups
from scoring.scorer import Scorer
from scoring.state import load_state
from tracer import kernel

pytestmark = [pytest.mark.root, pytest.mark.bpf]

IMDS = "169.254.169.254"


def _pid(ns: MetadataNamespace, argv: list[str]) -> int:
    p = ns.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p.wait(20)
    return p.pid


def _alerts_of(agent: AgentProcess, pid: int) -> list[dict]:
    # The agent sees the whole machine: other metadata traffic must not confuse the test.
    return [a for a in agent.alert_lines() if a["process"].get("pid") == pid]


@pytest.fixture(scope="module")
def ns():
    require_bcc()
    with MetadataNamespace(v4=(IMDS,), v6=("fd00:ec2::254",)) as n:
        yield n


@pytest.fixture
def agent_factory(tmp_path):
    agents: list[AgentProcess] = []

    def make(*args: str) -> AgentProcess:
        a = AgentProcess(tmp_path, *args)
        agents.append(a)
        return a.start()

    yield make
    for a in agents:
        a.kill()


def test_warm_agent_alerts_on_a_rare_caller(ns, tmp_path, agent_factory):
    state = tmp_path / "state.json"
    warm_state(state)
    size_before = state.stat().st_size
    agent = agent_factory("--state", str(state), "--learning-period", "0s")
    assert agent.metric("imdswatch_ready") == 1 and agent.metric("imdswatch_probe_info") == 1
    assert "probe auto chose" in agent.log.read_text()

    curl = _pid(ns, ["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/latest/meta-data/"])
    assert wait_for(lambda: _alerts_of(agent, curl), 5)
    (alert,) = _alerts_of(agent, curl)
    assert alert["event"]["kind"] == "alert"
    assert alert["process"]["name"] == "curl"
    assert alert["destination"]["ip"] == IMDS
    assert alert["anomaly"]["score"] >= 50 and alert["anomaly"]["detector"]
    assert "curl" in alert["anomaly"]["reason"]

    _pid(ns, ["setpriv", "--reuid=65534", "wget", "-q", "-O", "/dev/null",
              f"http://{IMDS}/latest/meta-data/"])
    # >=: a system-wide agent also counts any other metadata traffic on this machine
    assert wait_for(lambda: agent.metric("imdswatch_metadata_connections_total",
                                         process="wget", user="nobody") >= 1, 5)
    assert agent.metric("imdswatch_metadata_connections_total", process="curl") >= 1
    assert agent.metric("imdswatch_anomalies_total") >= 1
    assert wait_for(lambda: agent.metric("imdswatch_kernel_connections_total") >= 2, 5)
    assert agent.metric("imdswatch_kernel_events_dropped_total") == 0

    rc, seconds = agent.stop(signal.SIGTERM)
    assert rc == 0 and seconds < 5
    scorer = Scorer()
    load_state(state, scorer)
    assert scorer.events_learned >= 3002 and state.stat().st_size != size_before


def test_learning_period_holds_alerts_back(ns, agent_factory):
    agent = agent_factory("--learning-period", "1h")
    curl = _pid(ns, ["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/"])
    bash = _pid(ns, ["bash", "-c", f"exec 3<>/dev/tcp/{IMDS}/80"])
    assert wait_for(lambda: agent.metric("imdswatch_metadata_connections_total") >= 2, 5)
    assert agent.metric("imdswatch_learning") == 1
    assert _alerts_of(agent, curl) == _alerts_of(agent, bash) == []
    rc, _ = agent.stop(signal.SIGINT)
    assert rc == 0


def test_sighup_reloads_endpoints_into_the_kernel(ns, tmp_path, agent_factory):
    config = tmp_path / "imdswatch.toml"
    config.write_text('[endpoints]\nremove = ["imds"]\n')
    agent = agent_factory("--config", str(config), "--learning-period", "1h")
    _pid(ns, ["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/"])
    time.sleep(1.5)  # kernel counters are published every second
    before = agent.metric("imdswatch_metadata_connections_total", endpoint="imds")
    assert before == 0
    # the kernel filter held it back: had it been emitted, the scorer would count it skipped
    assert agent.metric("imdswatch_events_skipped_total") == 0
    config.write_text("[endpoints]\nremove = []\n")
    agent.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "config reloaded" in agent.log.read_text(), 5)
    _pid(ns, ["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/"])
    assert wait_for(lambda: agent.metric("imdswatch_metadata_connections_total",
                                         process="curl", endpoint="imds") >= 1, 5)
    assert agent.stop()[0] == 0


def test_ipv6_endpoint_scored_live(ns, tmp_path, agent_factory):
    state = tmp_path / "state.json"
    warm_state(state)
    agent = agent_factory("--state", str(state), "--learning-period", "0s")
    py = _pid(ns, ["/usr/bin/python3", "-c", "import socket; s=socket.socket(socket.AF_INET6); "
                   "s.connect(('fd00:ec2::254', 80))"])
    assert wait_for(lambda: _alerts_of(agent, py), 5)
    (alert,) = _alerts_of(agent, py)
    assert alert["destination"]["ip"] == "fd00:ec2::254"
    assert alert["process"]["name"] == "python3"
    assert agent.stop()[0] == 0


def test_unavailable_probe_fails_fast(tmp_path):
    require_bcc()
    if kernel.kprobes_available():
        pytest.skip("this kernel has kprobes, so --probe kprobe does not fail here")
    a = AgentProcess(tmp_path, "--probe", "kprobe")
    t0 = time.monotonic()
    r = subprocess.run(a.argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "CONFIG_KPROBES" in r.stderr and "fix:" in r.stderr
    assert time.monotonic() - t0 < 30
    assert not os.path.exists(a.alerts) or a.alerts.read_text() == ""


def test_flood_counted_per_process_in_kernel(ns, agent_factory):
    """The labelled kernel counter equals the connects made, drops or not."""
    agent = agent_factory("--learning-period", "1h")
    comm = f"imdsw-a{secrets.token_hex(3)}"
    r = ns.run(["python3", str(LAB / "flood_client.py"), IMDS, "9", "3000", "20", comm],
               timeout=30)
    assert r.returncode == 0, r.stderr
    made = int(r.stdout.split()[0])
    name = "imdswatch_kernel_connections_by_process_total"
    assert wait_for(lambda: agent.metric(name, process=comm) == made, 5), (
        agent.metric(name, process=comm), made)
    assert agent.metric(name, process=comm, uid="0") == made
    time.sleep(1.2)  # another housekeeping round adds nothing
    assert agent.metric(name, process=comm) == made
    assert agent.stop()[0] == 0


def _cgroup2_root() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2" and os.access(fields[1], os.W_OK):
            return Path(fields[1])
    return None


@contextlib.contextmanager
def pod_cgroup(pod_uid: str, container_id: str) -> Iterator[Path]:
    """A cgroup shaped like the kubelet's (cgroupfs driver): .../kubepods/pod<uid>/<id>."""
    root = _cgroup2_root()
    if root is None:
        pytest.skip("needs a writable cgroup2 mount to place a client in a pod cgroup")
    top = root / f"imdsw-test-{secrets.token_hex(4)}"
    leaf = top / "kubepods" / f"pod{pod_uid}" / container_id
    try:
        leaf.mkdir(parents=True)
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup under {root}: {exc}")
    try:
        yield leaf
    finally:
        remove_cgroups((leaf, leaf.parent, leaf.parent.parent, top))


def test_pod_names_from_the_kubernetes_api(ns, tmp_path, agent_factory):
    api = FakeApi(tmp_path, "--anonymous")
    try:
        state = tmp_path / "state.json"
        warm_state(state)
        config = tmp_path / "imdswatch.toml"
        config.write_text(f'[agent]\nnode_name = "node-1"\nkubernetes_api = "{api.base}"\n')
        with pod_cgroup(UID_A, CID_A) as cgroup:
            agent = agent_factory("--config", str(config), "--state", str(state),
                                  "--learning-period", "0s")
            assert wait_for(lambda: "Kubernetes enrichment: watching" in agent.log.read_text(),
                            5)
            # A watch follows the first list: the pod is known before curl runs.
            assert wait_for(lambda: any(q.get("watch") == "1" for q in api.queries()), 10)
            procs = cgroup / "cgroup.procs"
            # Joined before exec (`ip netns exec` remounts /sys, so not from inside).
            p = ns.popen(["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/latest/meta-data/"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         preexec_fn=lambda: procs.write_text(str(os.getpid())))
            p.wait(20)
            curl = p.pid
            assert wait_for(lambda: _alerts_of(agent, curl), 5)
            (alert,) = _alerts_of(agent, curl)
            assert alert["orchestrator"]["namespace"] == "web"
            assert alert["orchestrator"]["resource"] == {
                "type": "pod", "id": UID_A, "name": "web-7d9f"}
            assert alert["container"]["id"] == CID_A
            assert alert["container"]["image"] == {"name": IMAGE_A}
            assert agent.metric("imdswatch_metadata_connections_total", process="curl",
                                k8s_namespace="web") >= 1
            rc, seconds = agent.stop(signal.SIGTERM)
            assert rc == 0 and seconds < 5
    finally:
        api.stop()
