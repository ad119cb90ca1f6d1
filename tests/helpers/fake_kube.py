"""The fake Kubernetes API server (fake_kube_api.py) as a real process on loopback, for
tests/test_kubernetes.py and the agent tests."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

FAKE = Path(__file__).parent / "fake_kube_api.py"
UID_A = "0f6c1f8e-8d0b-4b8e-9a39-6c3c1a1e0a01"
UID_OTHER = "2b2b3c4d-0000-4b8e-9a39-6c3c1a1e0a03"
CID_A = "a1" * 32
IMAGE_A = "registry.local/web/frontend:1.4"


class FakeApi:
    def __init__(self, tmp: Path, *extra: str, tls: bool = False) -> None:
        port_file = tmp / "port"
        args = [sys.executable, str(FAKE), str(port_file), *extra,
                "--pod", f"{UID_A},web-7d9f,web,node-1,containerd://{CID_A}={IMAGE_A}",
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

    def post(self, op: str, **pod: object) -> None:
        req = urllib.request.Request(f"{self.base}/control/{op}", data=json.dumps(pod).encode(),
                                     headers={"Content-Type": "application/json"})
        ctx = None
        if self.scheme == "https":
            import ssl
            ctx = ssl.create_default_context(cafile=str(self.cert))
        urllib.request.urlopen(req, timeout=5, context=ctx).read()

    def queries(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.base}/control/queries", timeout=5) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=5)
