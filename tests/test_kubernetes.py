"""Pod UID -> namespace/name against a real (tiny) API server process on loopback."""

import json
import logging
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tracer.kubernetes import PodDirectory

FAKE = Path(__file__).parent / "helpers" / "fake_kube_api.py"
UID_A = "0f6c1f8e-8d0b-4b8e-9a39-6c3c1a1e0a01"
UID_B = "1a2b3c4d-0000-4b8e-9a39-6c3c1a1e0a02"
UID_OTHER = "2b2b3c4d-0000-4b8e-9a39-6c3c1a1e0a03"


class FakeApi:
    def __init__(self, tmp: Path, *extra: str, tls: bool = False) -> None:
        port_file = tmp / "port"
        args = [sys.executable, str(FAKE), str(port_file), *extra,
                "--pod", f"{UID_A},web-7d9f,web,node-1",
                "--pod", f"{UID_OTHER},db-0,data,node-2"]
        self.scheme = "http"
        if tls:
            self.cert, key = tmp / "ca.crt", tmp / "key.pem"
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                 "-keyout", str(key), "-out", str(self.cert), "-subj", "/CN=127.0.0.1",
                 "-addext", "subjectAltName=IP:127.0.0.1"],
                check=True, capture_output=True)
            args += ["--cert", str(self.cert), "--key", str(key)]
            self.scheme = "https"
        self.proc = subprocess.Popen(args)
        deadline = time.monotonic() + 10
        while not port_file.exists():
            assert time.monotonic() < deadline, "fake API server did not start"
            assert self.proc.poll() is None, "fake API server exited"
            time.sleep(0.02)
        self.port = int(port_file.read_text())
        self.base = f"{self.scheme}://127.0.0.1:{self.port}"

    def post(self, op: str, **pod: str) -> None:
        req = urllib.request.Request(f"{self.base}/control/{op}", data=json.dumps(pod).encode(),
                                     headers={"Content-Type": "application/json"})
        ctx = None
        if self.scheme == "https":
            import ssl
            ctx = ssl.create_default_context(cafile=str(self.cert))
        urllib.request.urlopen(req, timeout=5, context=ctx).read()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=5)


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
        time.sleep(1.0)  # several retries happen in this time
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
