# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them. Real connections happen only inside a test's own network namespace
# (netns, tests/netns_fixtures.py).
"""Pod UID -> namespace/name (and container id -> image) against a real (tiny) API server
process on loopback, and the enrichment it gives live events, up to the scorer."""

import json
import logging
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers.fake_kube import CID_A, IMAGE_A, UID_A, UID_OTHER, FakeApi

from imdswatch.agent import start_pod_directory
from intake.parser import event_from_ecs
from scoring.scorer import Scorer
from scoring.settings import ScorerSettings
from tracer.kubernetes import PodDirectory
from tracer.layout import KernelEvent
from tracer.session import Tracer

UID_B = "1a2b3c4d-0000-4b8e-9a39-6c3c1a1e0a02"
UID_UNKNOWN = "3c3c3c4d-0000-4b8e-9a39-6c3c1a1e0a04"
CID_B = "b2" * 32


@pytest.fixture
def token(tmp_path) -> Path:
    path = tmp_path / "token"
    path.write_text("test-token\n")
    return path


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_list_then_watch_over_http(tmp_path, token) -> None:
    api = FakeApi(tmp_path)
    pods = PodDirectory(api.base, "node-1", token_path=token, watch_timeout=2).start()
    try:
        assert pods.wait_synced(10)
        assert pods.lookup(UID_A) == ("web", "web-7d9f")
        assert pods.lookup(UID_A.replace("-", "_")) == ("web", "web-7d9f")  # systemd cgroups
        assert pods.lookup(UID_OTHER) is None  # another node's pod is never listed
        api.post("add", uid=UID_B, name="job-x", namespace="batch", node="node-1")
        assert wait_for(lambda: pods.lookup(UID_B) == ("batch", "job-x"))
        # Deleted pods stay resolvable for late events from exiting processes.
        api.post("delete", uid=UID_B, name="job-x", namespace="batch", node="node-1")
        time.sleep(0.5)
        assert pods.lookup(UID_B) == ("batch", "job-x")
        assert pods.lookup(None) is None and pods.lookup("unknown") is None
    finally:
        pods.close()
        api.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a cert")
def test_https_with_service_account_ca(tmp_path, token) -> None:
    api = FakeApi(tmp_path, tls=True)
    pods = PodDirectory(api.base, "node-1", token_path=token, ca_path=api.cert).start()
    try:
        assert pods.wait_synced(10)
        assert pods.lookup(UID_A) == ("web", "web-7d9f")
    finally:
        pods.close()
        api.stop()


def test_forbidden_degrades_with_one_warning(tmp_path, token, caplog) -> None:
    api = FakeApi(tmp_path, "--deny")
    caplog.set_level(logging.WARNING, logger="tracer.kubernetes")
    pods = PodDirectory(api.base, "node-1", token_path=token, max_backoff=0.1).start()
    try:
        assert wait_for(lambda: len(api.queries()) >= 3)  # several retries, each refused
        assert pods.lookup(UID_A) is None
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "pod UID only" in warnings[0].getMessage()
    finally:
        pods.close()
        api.stop()


def test_unreachable_api_never_raises(tmp_path, token, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="tracer.kubernetes")
    pods = PodDirectory("http://127.0.0.1:9", "node-1", token_path=token,
                        max_backoff=0.1).start()
    time.sleep(0.5)
    assert pods.lookup(UID_A) is None
    assert not pods.wait_synced(0)
    pods.close()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_outside_a_cluster_is_disabled(monkeypatch, caplog) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    caplog.set_level(logging.WARNING, logger="tracer.kubernetes")
    pods = PodDirectory().start()
    assert pods.disabled_reason and pods.lookup(UID_A) is None
    assert "pod UID only" in caplog.text


def test_in_cluster_defaults_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setenv("NODE_NAME", "node-7")
    pods = PodDirectory()
    assert pods.api_base == "https://10.96.0.1:443" and pods.node_name == "node-7"
    assert pods.disabled_reason is None


def test_container_images_from_pod_status(tmp_path, token) -> None:
    api = FakeApi(tmp_path)
    pods = PodDirectory(api.base, "node-1", token_path=token, watch_timeout=2).start()
    try:
        assert pods.wait_synced(10)
        assert pods.container_image(CID_A) == IMAGE_A
        assert pods.container_image(CID_A.upper()) == IMAGE_A
        assert pods.container_image(CID_B) is None and pods.container_image(None) is None
        api.post("add", uid=UID_B, name="job-x", namespace="batch", node="node-1",
                 containers={f"cri-o://{CID_B}": "quay.io/batch/job:2"})
        assert wait_for(lambda: pods.container_image(CID_B) == "quay.io/batch/job:2")
    finally:
        pods.close()
        api.stop()


def test_close_ends_an_open_watch_at_once(tmp_path, token) -> None:
    api = FakeApi(tmp_path)
    # A long watch and read timeout: only cutting the connection can end the thread quickly.
    pods = PodDirectory(api.base, "node-1", token_path=token, watch_timeout=300,
                        read_timeout=120).start()
    try:
        assert pods.wait_synced(10)
        assert wait_for(lambda: any(q.get("watch") == "1" for q in api.queries()))
        time.sleep(0.1)  # the watch's request was read: let its stream begin
        t0 = time.monotonic()
        pods.close()
        assert time.monotonic() - t0 < 2.5
        assert pods._thread is not None and not pods._thread.is_alive()
    finally:
        api.stop()


def _fake_proc(root: Path, pid: int, comm: str, cgroup: str) -> None:
    d = root / str(pid)
    (d / "task" / str(pid)).mkdir(parents=True)
    (d / "task" / str(pid) / "comm").write_text(comm + "\n")
    os.symlink(f"/usr/bin/{comm}", d / "exe")
    (d / "cmdline").write_bytes(comm.encode() + b"\0http://169.254.169.254/\0")
    (d / "status").write_text(f"Name:\t{comm}\nPPid:\t1\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n")
    (d / "cgroup").write_text(cgroup)


def _kernel_event(pid: int, comm: str) -> KernelEvent:
    return KernelEvent(ts_ns=time.monotonic_ns(), tid=pid, tgid=pid, uid=0, gid=0, cgroup_id=7,
                       comm=comm, family=2, dst_ip="169.254.169.254", dst_port=80,
                       probe="tracepoint", result=None)


def test_live_events_get_pod_namespace_and_image(tmp_path, token) -> None:
    """Enrichment end to end without BPF: a /proc-like root whose processes sit in pod
    cgroups, the tracer's own document path with a real PodDirectory, then the scorer."""
    proc = tmp_path / "proc"
    systemd_uid = UID_A.replace("-", "_")
    _fake_proc(proc, 500, "curl", "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-"
               f"besteffort-pod{systemd_uid}.slice/cri-containerd-{CID_A}.scope\n")
    _fake_proc(proc, 600, "wget", f"0::/kubepods/burstable/pod{UID_UNKNOWN}/{CID_B}\n")
    _fake_proc(proc, 700, "python3", "0::/user.slice/session-1.scope\n")
    api = FakeApi(tmp_path)
    pods = PodDirectory(api.base, "node-1", token_path=token).start()
    tracer = Tracer([], probe="tracepoint", proc_root=str(proc), host_name="node-1",
                    ringbuf=False, pods=pods)
    try:
        assert pods.wait_synced(10)
        doc = tracer.document(_kernel_event(500, "curl"))
        assert doc["orchestrator"] == {
            "type": "kubernetes", "namespace": "web",
            "resource": {"type": "pod", "id": UID_A, "name": "web-7d9f"}}
        assert doc["container"]["image"] == {"name": IMAGE_A}
        ev = event_from_ecs(json.loads(json.dumps(doc)))
        assert (ev.namespace, ev.pod, ev.image) == ("web", "web-7d9f", IMAGE_A)
        # The scorer sees the namespace: rare_container's entity is image + namespace.
        scorer = Scorer(ScorerSettings(learning_period=0))
        outcome = scorer.process(ev)
        assert outcome is not None and "rare_container" in outcome.scores
        assert scorer.model_size()["rare_container"] >= 1

        unresolved = tracer.document(_kernel_event(600, "wget"))
        assert unresolved["orchestrator"] == {
            "type": "kubernetes", "resource": {"type": "pod", "id": UID_UNKNOWN}}
        assert "image" not in unresolved["container"]
        ev = event_from_ecs(unresolved)
        assert ev.namespace is None and ev.pod is None and ev.image is None

        host = tracer.document(_kernel_event(700, "python3"))
        assert "orchestrator" not in host and "container" not in host
    finally:
        pods.close()
        api.stop()


def test_unreachable_api_leaves_events_with_the_uid(tmp_path, token) -> None:
    proc = tmp_path / "proc"
    _fake_proc(proc, 500, "curl", f"0::/kubepods/besteffort/pod{UID_A}/{CID_A}\n")
    pods = PodDirectory("http://127.0.0.1:9", "node-1", token_path=token).start()
    tracer = Tracer([], probe="tracepoint", proc_root=str(proc), ringbuf=False, pods=pods)
    try:
        t0 = time.monotonic()
        doc = tracer.document(_kernel_event(500, "curl"))
        assert time.monotonic() - t0 < 0.5  # never waits for the API
        assert doc["orchestrator"]["resource"] == {"type": "pod", "id": UID_A}
        assert "image" not in doc["container"]
    finally:
        pods.close()


def _agent_settings(**kw: object) -> SimpleNamespace:
    return SimpleNamespace(**{"kubernetes": "auto", "kubernetes_api": None,
                              "node_name": "node-1", **kw})


def test_agent_starts_a_directory_only_in_a_cluster(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    caplog.set_level(logging.WARNING)
    assert start_pod_directory(_agent_settings()) is None
    assert caplog.text == ""  # outside a cluster nothing to warn about
    assert start_pod_directory(_agent_settings(kubernetes="off",
                                               kubernetes_api="http://x")) is None
    forced = start_pod_directory(_agent_settings(kubernetes="on"))
    assert forced is not None and forced.disabled_reason and "pod UID only" in caplog.text
    forced.close()

    api = FakeApi(tmp_path, "--anonymous")
    try:
        # kubernetes_api given (e.g. kubectl proxy): auto enables it; no token is needed.
        pods = start_pod_directory(_agent_settings(kubernetes_api=api.base))
        assert pods is not None and pods.wait_synced(10)
        assert pods.lookup(UID_A) == ("web", "web-7d9f")
        pods.close()
        # In a cluster, auto uses the in-cluster address from the environment.
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api.port))
        pods = start_pod_directory(_agent_settings())
        assert pods is not None and pods.api_base == f"https://127.0.0.1:{api.port}"
        pods.close()
    finally:
        api.stop()


@pytest.mark.parametrize("mode", ["error", "gone"])
def test_an_expired_watch_relists(tmp_path, token, mode) -> None:
    """The server compacts its history: an `ERROR` (410 Expired) inside the stream, or a
    410 Gone answer to the next watch. A pod added meanwhile has no watch event of its own:
    only the relist the directory must make can see it."""
    api = FakeApi(tmp_path)
    pods = PodDirectory(api.base, "node-1", token_path=token, watch_timeout=30,
                        max_backoff=0.2).start()
    try:
        assert pods.wait_synced(10)
        assert wait_for(lambda: any(q.get("watch") == "1" for q in api.queries()))
        lists_before = sum("watch" not in q for q in api.queries())
        api.post("expire", mode=mode,
                 add={"uid": UID_B, "name": "job-x", "namespace": "batch", "node": "node-1"})
        assert wait_for(lambda: pods.lookup(UID_B) == ("batch", "job-x")), api.queries()
        assert sum("watch" not in q for q in api.queries()) > lists_before
        assert pods.lookup(UID_A) == ("web", "web-7d9f")  # the relist kept the others
    finally:
        pods.close()
        api.stop()


def test_a_bookmark_is_where_the_next_watch_resumes(tmp_path, token) -> None:
    """A BOOKMARK carries the version the server reached without events for this node: the
    directory resumes its next watch from it (not from the list's older version), so a
    quiet node does not fall behind into a 410 and a full relist."""
    api = FakeApi(tmp_path)
    pods = PodDirectory(api.base, "node-1", token_path=token, watch_timeout=1).start()
    try:
        assert pods.wait_synced(10)
        assert wait_for(lambda: any(q.get("watch") == "1" for q in api.queries()))
        assert all(q.get("allowWatchBookmarks") == "true" for q in api.queries()
                   if q.get("watch") == "1")
        api.post("bookmark", version=500)
        assert wait_for(lambda: any(q.get("resourceVersion") == "500"
                                    for q in api.queries() if q.get("watch") == "1"),
                        timeout=15), api.queries()
        assert sum("watch" not in q for q in api.queries()) == 1  # resumed, never relisted
    finally:
        pods.close()
        api.stop()
