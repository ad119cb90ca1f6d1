"""`imdswatch serve` as a real process on loopback: scoring equal to `imdswatch replay`,
durable acknowledgement across SIGKILL, idempotent retries, the error paths (400, 401, 413,
503), TLS with a CA made here by openssl, and the model endpoint."""

from __future__ import annotations

import gzip
import json
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request

import pytest
from fleet_fixtures import (
    ServeProcess,
    comparable,
    fleet_events,
    post,
    replay_alerts,
    wait_scored,
)
from netns_fixtures import wait_for

LEARN = ("--learning-period", "2h")


def wait_checkpoint(serve, timeout: float = 30.0) -> bool:
    """A checkpoint taken after now (its time from serve's own metric), not a fixed sleep."""
    since = time.time()
    return wait_for(lambda: serve.metric("imdswatch_fleet_checkpoint_timestamp_seconds")
                    > since, timeout)


def _send_all(url: str, batches: list[bytes], token: str | None = None,
              pause: float = 0.0) -> list[tuple[int, dict]]:
    """Send each batch until it is acknowledged (an agent's behaviour): a batch whose
    answer was lost is sent again."""
    answers = []
    for b in batches:
        while True:
            status, _h, body = post(url, b, token, gz=True)
            if status == 200:
                answers.append((status, json.loads(body)))
                break
            time.sleep(0.1)
        time.sleep(pause)
    return answers


@pytest.mark.parametrize("output", ["file", "-"])
def test_scores_like_replay_and_survives_sigkill(tmp_path, output):
    """With --output FILE the lines written since the checkpoint are read back; on standard
    output they are known from the journal beside the state: either way no alert twice."""
    events = fleet_events()
    batches = [b"\n".join(events[i:i + 150]) for i in range(0, len(events), 150)]
    serve = ServeProcess(tmp_path, *LEARN, "--save-interval", "1s", output=output).start()
    try:
        answers: list = []
        sender = threading.Thread(
            target=lambda: answers.extend(_send_all(serve.url, batches, None, 0.03)))
        sender.start()
        # Kill it mid-stream, hard, after at least one checkpoint and with batches in flight.
        assert wait_for(lambda: serve.metric("imdswatch_ingest_events_total",
                                             result="accepted") >= 6000, 60)
        assert wait_checkpoint(serve)
        serve.proc.send_signal(signal.SIGKILL)
        serve.proc.wait(10)
        time.sleep(0.5)  # the sender keeps retrying meanwhile
        serve.start()
        sender.join(120)
        assert not sender.is_alive()
        assert len(answers) == len(batches), "the sender stopped before all were acknowledged"
        # A retry of already acknowledged batches is taken as duplicates, not scored again.
        status, _h, body = post(serve.url, batches[0] + b"\n" + batches[-1])
        assert status == 200 and json.loads(body)["accepted"] == 0
        assert json.loads(body)["duplicates"] == 150 + (len(events) % 150 or 150)
        time.sleep(1.5)  # the reorder hold
        assert serve.stop() == 0
    finally:
        serve.kill()
    got = serve.alert_lines()
    want = replay_alerts(tmp_path, events, *LEARN)
    assert want, "the trace must produce alerts for the comparison to mean anything"
    assert all(a["imdswatch"]["scored_by"] == "fleet" for a in got)
    ids = [a["event"]["id"] for a in got]
    assert len(ids) == len(set(ids)), "an event alerted twice"
    assert comparable(got) == comparable(want)
    state = json.loads(serve.state.read_text())
    assert state["events_learned"] == len(events)
    assert "killed" not in serve.log.read_text()
    # Older journal generations go once a checkpoint no longer needs them.
    assert len(list(tmp_path.glob("fleet-state.json.alerts.*"))) <= (1 if output == "-" else 0)
    # The log was truncated: the saved state contains everything.
    assert sum(p.stat().st_size for p in (tmp_path / "fleet-state.json.wal").iterdir()) == 0


def test_state_show_and_model_endpoint(tmp_path):
    events = fleet_events()[:500]
    serve = ServeProcess(tmp_path, "--save-interval", "1s").start()
    try:
        assert post(serve.url, b"\n".join(events))[0] == 200
        assert wait_scored(serve, 500 - 30)  # the newest wait in the reorder buffer
        assert wait_checkpoint(serve)  # /v1/model serves the latest checkpoint
        req = urllib.request.Request(f"{serve.url}/v1/model",
                                     headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(req, timeout=5) as r:
            etag = r.headers["ETag"]
            model = json.loads(gzip.decompress(r.read()))
        assert model["format"] == "imdswatch-state" and "fleet" not in model
        assert model["events_learned"] >= 400 and len(model["hosts"]) >= 2
        req = urllib.request.Request(f"{serve.url}/v1/model", headers={"If-None-Match": etag})
        try:
            urllib.request.urlopen(req, timeout=5)
            code = 200
        except urllib.error.HTTPError as exc:
            code = exc.code
        assert code in (200, 304)  # 200 only if a checkpoint published a newer model
        assert serve.stop() == 0
    finally:
        serve.kill()
    out = subprocess.run([*__import__("fleet_fixtures").CMD, "state", "show",
                          str(serve.state)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "metadata events scored: 500" in out.stdout


def test_bad_bodies(tmp_path):
    serve = ServeProcess(tmp_path, "--max-body", "64KiB").start()
    try:
        ok = b"\n".join(fleet_events()[:3])
        # Not NDJSON at all: 400. Some malformed lines among good ones: counted, 200.
        assert post(serve.url, b"<html>hello</html>")[0] == 400
        status, _h, body = post(serve.url, ok + b"\n{not json\n{\"a\": 1}\n")
        assert status == 200
        assert json.loads(body) == {"accepted": 3, "duplicates": 0, "malformed": 2,
                                    "skipped": 0}
        # A Logstash json_batch body: one JSON array of events.
        arr = b"[" + b",".join(fleet_events(prefix="arr")[:2]) + b"]"
        assert json.loads(post(serve.url, arr)[2])["accepted"] == 2
        # Over the limit: 413 before reading; a gzip bomb: 413 after inflating 64 KiB.
        assert post(serve.url, b"x" * (65 * 1024))[0] == 413
        bomb = b"\n" * (50 << 20)
        status, _h, _b = post(serve.url, bomb, gz=True)
        assert status == 413
        assert post(serve.url, b"garbage", headers={"Content-Encoding": "gzip"})[0] == 400
        assert post(serve.url, ok, headers={"Content-Encoding": "br"})[0] == 415
        assert serve.metric("imdswatch_ingest_requests_total", code="413") == 2
    finally:
        serve.kill()


def test_backpressure_503_with_retry_after(tmp_path):
    serve = ServeProcess(tmp_path, "--queue-events", "1000", "--max-body", "64MiB").start()
    try:
        big = b"\n".join(fleet_events(hosts=20, prefix="big"))
        small = b"\n".join(fleet_events(prefix="small", start=1_800_000_000.0)[:10])
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("r", post(serve.url, big, gz=True)))
        t.start()
        # While the ~40,000 events (over the queue's bound, taken because it was empty)
        # are being scored, the queue has no room.
        answers = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status, headers, _ = post(serve.url, small)
            answers.append(status)
            if status == 503:
                assert headers.get("Retry-After") == "1"
                break
            time.sleep(0.02)
        t.join(60)
        assert first["r"][0] == 200
        assert 503 in answers
        # Once the scorer caught up the same batch is taken.
        assert wait_for(lambda: post(serve.url, small)[0] == 200, 60)
    finally:
        serve.kill()


def test_connection_limit(tmp_path):
    serve = ServeProcess(tmp_path, "--max-connections", "2").start()
    held = [socket.create_connection(("127.0.0.1", serve.port)) for _ in range(2)]
    try:
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", serve.port), timeout=5) as s:
            assert s.recv(100).startswith(b"HTTP/1.1 503")
    finally:
        for s in held:
            s.close()
        serve.kill()
    assert serve.metric  # (the process is gone; metrics were checked through the answer)


def test_token_required_and_never_logged(tmp_path):
    token = "s3cr3t-" + "a" * 40
    tf = tmp_path / "token"
    tf.write_text(token + "\n")
    serve = ServeProcess(tmp_path, "--token-file", str(tf)).start()
    try:
        body = b"\n".join(fleet_events()[:5])
        assert post(serve.url, body)[0] == 401
        assert post(serve.url, body, token="wrong")[0] == 401
        assert post(serve.url, body, token=token[:-1])[0] == 401
        status, headers, _ = post(serve.url, body, token=token)
        assert status == 200
        for tok, want in ((None, 401), ("nope", 401), (token, 200)):
            h = {"Authorization": f"Bearer {tok}"} if tok else {}
            req = urllib.request.Request(f"{serve.url}/v1/model", headers=h)
            try:
                code = urllib.request.urlopen(req, timeout=5).status
            except urllib.error.HTTPError as exc:
                code = exc.code
            assert code == want
        assert serve.metric("imdswatch_ingest_requests_total", code="401") == 5
        assert serve.stop() == 0
    finally:
        serve.kill()
    assert token not in serve.log.read_text()
    assert token not in serve.alerts.read_text()


def _make_ca(tmp):
    """A CA and a server certificate for 127.0.0.1 it signed, made with openssl."""
    def ossl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp, timeout=60)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
         "ca.crt", "-days", "2", "-subj", "/CN=imdswatch test CA")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
         "server.csr", "-subj", "/CN=127.0.0.1")
    (tmp / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ossl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.ext")
    return tmp / "ca.crt", tmp / "server.crt", tmp / "server.key"


def test_tls_with_a_ca_made_here(tmp_path):
    if shutil.which("openssl") is None:
        pytest.fail("openssl is part of `make setup`")
    ca, cert, key = _make_ca(tmp_path)
    serve = ServeProcess(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key),
                         scheme="https").start()
    try:
        body = b"\n".join(fleet_events()[:5])
        trusted = ssl.create_default_context(cafile=str(ca))
        assert post(serve.url, body, context=trusted)[0] == 200
        # Without the CA the certificate is not trusted; plain HTTP gets no answer.
        assert post(serve.url, body, context=ssl.create_default_context())[0] == 0
        assert post(serve.url.replace("https", "http"), body)[0] == 0
        from fleet.client import FleetClient, FleetUnavailable

        client = FleetClient(serve.url, ca_file=str(ca))
        assert client.send(body).duplicates == 5
        etag, model = client.fetch_model()
        assert model["format"] == "imdswatch-state" and etag
        with pytest.raises(FleetUnavailable):
            FleetClient(serve.url).send(body)
        assert serve.stop() == 0
    finally:
        serve.kill()


def test_unusable_arguments_exit_2(tmp_path):
    from fleet_fixtures import CMD

    def run(*args):
        return subprocess.run([*CMD, "serve", "--listen", "127.0.0.1:0", "--metrics-address",
                               "127.0.0.1:0", *args], capture_output=True, text=True,
                              timeout=60)

    r = run("--state", str(tmp_path / "missing-dir" / "s.json"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "empty").write_text("\n")
    r = run("--state", str(tmp_path / "s.json"), "--token-file", str(tmp_path / "empty"))
    assert r.returncode == 2 and "one token" in r.stderr
    r = run("--state", str(tmp_path / "s.json"), "--tls-cert", str(tmp_path / "empty"))
    assert r.returncode == 2 and "go together" in r.stderr
    (tmp_path / "bad.json").write_text("{nope")
    r = run("--state", str(tmp_path / "bad.json"))
    assert r.returncode == 2 and "bad.json" in r.stderr and "Traceback" not in r.stderr


def test_alert_cap_holds_back_lines_like_replay_and_across_a_restart(tmp_path):
    """serve writes at most the configured alert lines (the agent's and replay's cap), says
    how many it held back in a summary line and a metric, and a restart in between neither
    forgets the count nor writes a line twice."""
    config = tmp_path / "cap.toml"
    config.write_text("[alerts]\nmax_per_window = 0\nmax_per_run = 2\nwindow = \"1h\"\n")
    events = fleet_events()
    batches = [b"\n".join(events[i:i + 200]) for i in range(0, len(events), 200)]
    want = replay_alerts(tmp_path, events, *LEARN, "--config", str(config))
    held_want = [a for a in want if a["anomaly"]["detector"] == "alert_cap"]
    assert len(want) - len(held_want) == 2, "replay must cap for the comparison to mean anything"
    assert held_want, "the trace must produce more alerts than the cap"
    serve = ServeProcess(tmp_path, *LEARN, "--config", str(config), "--save-interval", "1s")
    serve.start()
    try:
        half = len(batches) // 2
        _send_all(serve.url, batches[:half])
        assert wait_scored(serve, sum(b.count(b"\n") + 1 for b in batches[:half]) - 200, 60)
        assert wait_checkpoint(serve)  # a checkpoint with the cap's position in it
        assert serve.stop() == 0
        serve.start()
        _send_all(serve.url, batches[half:])
        assert wait_scored(serve, 1, 60)
        # The reorder hold passes, then the window's summary comes by the wall clock: polled.
        assert wait_for(lambda: serve.metric("imdswatch_alerts_held_back_total") > 0, 30)
        held = serve.metric("imdswatch_alerts_held_back_total")
        assert serve.stop() == 0
    finally:
        serve.kill()
    got = serve.alert_lines()
    assert sorted(map(json.dumps, comparable(got))) == sorted(map(json.dumps, comparable(want)))
    held_got = sum(a["imdswatch"]["alerts"]["held_back"] for a in got
                   if a["anomaly"]["detector"] == "alert_cap")
    assert held_got == sum(a["imdswatch"]["alerts"]["held_back"] for a in held_want)
    # The metric counts what this process held back (the second run's share at least).
    assert 0 < held <= held_got
