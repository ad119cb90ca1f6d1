"""`imdswatch serve --bus` (contract section 8) against real nats-server processes on
loopback: replicas that all ingest and one that scores, equal to `imdswatch replay` under
faults (a window re-sent, the scoring replica SIGKILLed, a NATS node killed, the scoring
replica cut off from the bus), alerts exactly once on the ledger, on `imdswatch.alerts` and
in the replicas' outputs, the bus lost and back, credentials, TLS, corrupt checkpoints and
foreign messages, the fleet's policy served alike by every replica and after a takeover."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
from fleet_fixtures import CMD, ServeProcess, comparable, fleet_events, post, replay_alerts
from nats_fixtures import (
    READER_PASSWORD,
    READER_USER,
    SERVE_PASSWORD,
    SERVE_USER,
    AlertSubscriber,
    NatsServer,
    Proxy,
    cluster,
    ledger_alerts,
    ledger_records,
    run_client,
    start_all,
    urls,
    with_example_auth,
)
from netns_fixtures import free_port, wait_for

LEARN = ("--learning-period", "2h")
TTL = "3s"


@pytest.fixture
def nats_server(tmp_path):
    srv = NatsServer(tmp_path / "nats", "n1").start()
    try:
        yield srv
    finally:
        srv.stop()


def replica(tmp: Path, name: str, bus: str, *args: str) -> ServeProcess:
    d = tmp / name
    d.mkdir(exist_ok=True)
    return ServeProcess(d, *LEARN, "--bus", bus, "--replica-id", name, "--save-interval",
                        "1s", "--bus-lease-ttl", TTL, *args)


def batches_of(events: list[bytes], size: int = 150) -> list[bytes]:
    return [b"\n".join(events[i:i + size]) for i in range(0, len(events), size)]


class Sender:
    """An agent's behaviour against a Service of replicas: each batch is sent until one
    replica acknowledges it (round-robin, the next one on any failure)."""

    def __init__(self, replicas: list[ServeProcess]) -> None:
        self.replicas = replicas
        self.turn = 0
        self.answers: list[dict] = []
        self.refusals: list[tuple[int, dict]] = []

    def send(self, batch: bytes, deadline: float = 90.0) -> dict:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            r = self.replicas[self.turn % len(self.replicas)]
            self.turn += 1
            status, headers, body = post(r.url, batch, gz=True)
            if status == 200:
                answer = json.loads(body)
                self.answers.append(answer)
                return answer
            if status:
                self.refusals.append((status, headers))
            time.sleep(0.05)
        raise AssertionError("no replica acknowledged a batch in time")


def leaders(replicas: list[ServeProcess]) -> list[str]:
    out = []
    for r in replicas:
        try:
            if r.proc is not None and r.proc.poll() is None and \
                    r.metric("imdswatch_fleet_leader") == 1:
                out.append(r.workdir.name)
        except OSError:
            pass
    return out


def the_leader(replicas: list[ServeProcess], timeout: float = 30.0) -> ServeProcess:
    found: list[str] = []

    def one() -> bool:
        found[:] = leaders(replicas)
        return len(found) == 1

    assert wait_for(one, timeout, 0.05), f"not exactly one scoring replica: {found}"
    return next(r for r in replicas if r.workdir.name == found[0])


def all_scored(replicas: list[ServeProcess], url: str, n: int,
               stream: str = "IMDSWATCH") -> bool:
    """A checkpoint a replica wrote (its --state) holds the whole stream with all `n`
    events scored and none waiting in the reorder buffer."""

    async def last(_nc, js) -> int:
        return (await js.stream_info(stream)).state.last_seq

    end = run_client(url, last) + 1
    for r in replicas:
        try:
            state = json.loads(r.state.read_text())
        except (OSError, ValueError):
            continue
        fleet = state.get("fleet") or {}
        if fleet.get("stream_seq") == end and not fleet.get("pending") and \
                state.get("events_learned") == n:
            return True
    return False


def stream_leader(url: str, stream: str = "IMDSWATCH") -> str:
    async def leader(_nc, js) -> str:
        return (await js.stream_info(stream)).cluster.leader

    return run_client(url, leader)  # type: ignore[return-value]


def stop_all(replicas: list[ServeProcess]) -> None:
    for r in replicas:
        if r.proc is not None and r.proc.poll() is None:
            assert r.stop() == 0, r.log.read_text()[-3000:]


def kill_all(replicas: list[ServeProcess]) -> None:
    for r in replicas:
        r.kill()


def newest_state(replicas: list[ServeProcess]) -> dict:
    """The newest checkpoint a replica wrote to its --state (the last scoring replica's)."""
    states = [json.loads(r.state.read_text()) for r in replicas if r.state.exists()]
    return max(states, key=lambda s: (s["fleet"]["stream_seq"], s["events_learned"]))


def log_time(path: Path, pattern: str) -> float:
    """Wall time of the first log line matching `pattern` (the logs' asctime)."""
    for line in path.read_text().splitlines():
        if re.search(pattern, line):
            stamp = line[:23]
            return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError(f"no log line matches {pattern!r} in {path}")


# -- the basics on one server -----------------------------------------------------------------
def test_replicas_ingest_one_scores_like_replay(tmp_path, nats_server):
    events = fleet_events()
    batches = batches_of(events)
    subscriber = AlertSubscriber(nats_server.url)
    reps = [replica(tmp_path, f"r{i}", nats_server.url).start() for i in range(3)]
    try:
        the_leader(reps)
        sender = Sender(reps)
        for b in batches:
            assert sender.send(b)["duplicates"] == 0
        # A window re-sent to other replicas: the stream answers each message as a
        # duplicate (same lines, same message ids), whichever replica gets it.
        sender.turn = 1
        for b in batches[10:20]:
            a = sender.send(b)
            assert a["accepted"] == 0 and a["duplicates"] == b.count(b"\n") + 1, a
        assert wait_for(lambda: all_scored(reps, nats_server.url, len(events)), 90)
        # Any replica serves the newest checkpoint's model: one taken after the scoring
        # caught up comes within a few save intervals (1 s), later on a loaded machine.
        lead = the_leader(reps)
        follower = next(r for r in reps if r is not lead)
        served: list[dict] = []

        def model_served() -> bool:
            with urllib.request.urlopen(f"{follower.url}/v1/model", timeout=5) as resp:
                assert resp.headers["ETag"]
                served.append(json.loads(resp.read()))
            return served[-1]["events_learned"] > 10_000

        assert wait_for(model_served, 60), served[-1]["events_learned"]
        assert served[-1]["format"] == "imdswatch-state"
        assert len(leaders(reps)) == 1
        stop_all(reps)
    finally:
        kill_all(reps)
        subscriber.close()
    want = replay_alerts(tmp_path, events, *LEARN)
    assert want, "the trace must produce alerts for the comparison to mean anything"
    on_bus = [json.loads(x) for x in ledger_alerts(nats_server.url)]
    assert comparable(on_bus) == comparable(want)
    assert all(a["imdswatch"]["scored_by"] == "fleet" for a in on_bus)
    # Core subscribers get each stored alert once (republished by the ledger stream).
    assert sorted(subscriber.messages) == sorted(ledger_alerts(nats_server.url))
    written = [a for r in reps for a in r.alert_lines()]
    assert sorted(map(json.dumps, written)) == sorted(map(json.dumps, on_bus))
    assert newest_state(reps)["events_learned"] == len(events)


# -- equivalence under faults on a three-node cluster ------------------------------------------
def test_equivalence_under_faults_on_a_cluster(tmp_path):
    """Three replicas over three clustered servers (streams and buckets with three copies):
    the trace sent round-robin, a window re-sent, the scoring replica SIGKILLed mid-stream
    and restarted, one NATS node SIGKILLed and restarted. Events are scored as replay scores
    them, no alert is written twice anywhere, and another replica scores within 10 s."""
    servers = start_all(cluster(tmp_path / "nats"))
    bus = urls(servers)
    events = fleet_events()
    batches = batches_of(events)
    reps = [replica(tmp_path, f"r{i}", bus, "--bus-replicas", "3") for i in range(3)]
    for r in reps:
        r.start(timeout=60)
    takeover = -1.0
    try:
        sender = Sender(reps)
        third = len(batches) // 3
        for b in batches[:third]:
            sender.send(b)
        for b in batches[third - 8:third]:  # re-sent: scored once
            sender.send(b)
        old = the_leader(reps)
        time.sleep(1.2)  # a checkpoint behind, events after it in flight
        old.proc.send_signal(signal.SIGKILL)
        old.proc.wait(10)
        t0 = time.monotonic()
        others = [r for r in reps if r is not old]
        for b in batches[third:2 * third]:
            sender.send(b)
        new = the_leader(others, 30)
        takeover = float(new.metric("imdswatch_fleet_takeovers_total"))
        took = log_time(new.log, "scores the fleet's events") - (time.time() - (
            time.monotonic() - t0))
        old.start(timeout=60)
        # The NATS node leading the events stream SIGKILLed (an election follows), then
        # back; every client knows the other two.
        victim = next(s for s in servers if s.name == stream_leader(bus))
        victim.kill()
        for b in batches[2 * third:]:
            sender.send(b)
        victim.start(timeout=30)
        the_leader(reps, 60)
        assert wait_for(lambda: all_scored(reps, bus, len(events)), 120)
        stop_all(reps)
    finally:
        kill_all(reps)
        alerts = ledger_alerts(bus)
        for s in servers:
            s.stop()
    assert takeover >= 1
    print(f"takeover in {took:.2f}s")
    assert 0 < took < 10, f"takeover took {took:.1f}s"
    want = replay_alerts(tmp_path, events, *LEARN)
    on_bus = [json.loads(x) for x in alerts]
    ids = [a["event"]["id"] for a in on_bus]
    assert len(ids) == len(set(ids)), "an alert written twice on the bus"
    assert comparable(on_bus) == comparable(want)
    written = [a for r in reps for a in r.alert_lines()]
    wids = [a["event"]["id"] for a in written]
    assert len(wids) == len(set(wids)), "an alert written twice to the outputs"
    # Only the one line being written at the instant of the SIGKILL may be missing from
    # the killed replica's output (it is on the bus).
    assert set(wids) <= set(ids) and len(ids) - len(wids) <= 1
    assert newest_state(reps)["events_learned"] == len(events)


# -- a partition of the scoring replica ----------------------------------------------------------
def test_a_scoring_replica_cut_off_stops_before_another_starts(tmp_path, nats_server):
    """The scoring replica reaches the bus through a relay the test cuts (a dead link: no
    connection closed, nothing forwarded). By its own clock it stops scoring before its
    lease can age out; only then does another replica take over; nothing it holds is
    written afterwards, and the fleet's alerts are still replay's, each once."""
    events = fleet_events()
    batches = batches_of(events)
    relay = Proxy(nats_server.port)
    a = replica(tmp_path, "a", relay.url).start()
    reps = [a]
    try:
        assert the_leader(reps) is a
        b = replica(tmp_path, "b", nats_server.url).start()
        reps.append(b)
        sender = Sender(reps)
        half = len(batches) // 2
        for batch in batches[:half]:
            sender.send(batch)
        time.sleep(0.6)  # scoring, alerts in flight through the relay
        relay.cut.set()
        cut_at = time.time()
        only_b = Sender([b])
        for batch in batches[half:]:
            only_b.send(batch)
        assert wait_for(lambda: leaders(reps) == ["b"], 30, 0.05)
        # When its lease stopped counting as held by its own clock (the line says).
        line = next(x for x in a.log.read_text().splitlines() if "held until" in x)
        stamp = re.search(r"held until (\S+ \S+) by its clock", line).group(1)
        stopped = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        started = log_time(b.log, "now holds the scoring lease")
        # By its own clock, a quarter of the lease's time to live before it ages out.
        assert cut_at < stopped < started - 0.5, (cut_at, stopped, started)
        assert a.metric("imdswatch_fleet_leader") == 0
        relay.heal()
        assert wait_for(lambda: a.metric("imdswatch_fleet_bus_connected") == 1, 30)
        assert wait_for(lambda: all_scored(reps, nats_server.url, len(events)), 90)
        assert leaders(reps) == ["b"]
        stop_all(reps)
    finally:
        kill_all(reps)
        relay.close()
    records = ledger_records(nats_server.url)

    def writer(subj: str, data: bytes, headers: dict) -> str:
        return headers["Imdswatch-Replica"] if subj.endswith(".alert") else \
            json.loads(data)["replica"]

    writers = [(s, subj.rsplit(".", 1)[1], writer(subj, d, h)) for s, subj, d, h in records]
    assert [w for _s, kind, w in writers if kind == "takeover"] == ["a", "b"]
    b_took = next(s for s, kind, w in writers if kind == "takeover" and w == "b")
    assert {w for s, _k, w in writers if s > b_took} == {"b"}
    assert {w for s, _k, w in writers if s < b_took} == {"a"}
    want = replay_alerts(tmp_path, events, *LEARN)
    on_bus = [json.loads(x) for x in ledger_alerts(nats_server.url)]
    assert comparable(on_bus) == comparable(want)
    written = [x["event"]["id"] for r in reps for x in r.alert_lines()]
    assert len(written) == len(set(written)) and set(written) <= {x["event"]["id"]
                                                                  for x in on_bus}


# -- the bus lost and back; unusable at start ----------------------------------------------------
def test_bus_lost_503_with_retry_after_then_scoring_resumes(tmp_path, nats_server):
    events = fleet_events()[:3000]
    batches = batches_of(events)
    r = replica(tmp_path, "r0", nats_server.url).start()
    try:
        the_leader([r])
        for b in batches[:10]:
            assert post(r.url, b, gz=True)[0] == 200
        nats_server.stop()
        assert wait_for(lambda: r.metric("imdswatch_fleet_bus_connected") == 0, 15)
        status, headers, body = post(r.url, batches[10], gz=True)
        assert status == 503 and headers.get("Retry-After") == "2", (status, body)
        assert wait_for(lambda: r.metrics_get("/readyz")[0] == 503, 5)
        assert wait_for(lambda: r.metric("imdswatch_fleet_leader") == 0, 10)
        nats_server.start()  # same port, same store: what it acknowledged is still there
        assert wait_for(lambda: r.metrics_get("/readyz")[0] == 200, 30)
        sender = Sender([r])
        for b in batches[10:]:
            sender.send(b)
        assert wait_for(lambda: r.metric("imdswatch_fleet_leader") == 1, 30)
        assert wait_for(lambda: all_scored([r], nats_server.url, len(events)), 60)
        assert r.stop() == 0
    finally:
        r.kill()
    assert json.loads(r.state.read_text())["events_learned"] == len(events)
    assert "Traceback" not in r.log.read_text()


def _serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CMD, "serve", "--listen", f"127.0.0.1:{free_port()}",
                           "--metrics-address", f"127.0.0.1:{free_port()}", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_unusable_bus_at_start_exits_2(tmp_path):
    state = str(tmp_path / "s.json")
    dead = f"nats://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    r = _serve("--state", state, "--bus", dead)
    assert r.returncode == 2 and "cannot reach the bus" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and time.monotonic() - t0 < 30
    r = _serve("--state", state, "--bus", "nats://serve:hunter2@127.0.0.1:4222")
    assert r.returncode == 2 and "credentials in a URL" in r.stderr
    assert "hunter2" not in r.stderr
    r = _serve("--state", state, "--bus", "http://127.0.0.1:4222")
    assert r.returncode == 2 and "nats://HOST:PORT" in r.stderr
    r = _serve("--state", state, "--bus", dead, "--bus-creds", str(tmp_path / "missing"))
    assert r.returncode == 2 and "cannot read" in r.stderr
    r = _serve("--state", state, "--bus-creds", str(tmp_path / "x"))
    assert r.returncode == 2 and "go with --bus" in r.stderr
    r = _serve("--state", state, "--bus", dead, "--bus-stream", "a.b")
    assert r.returncode == 2 and "--bus-stream" in r.stderr


# -- credentials and TLS ------------------------------------------------------------------------
def _make_ca(tmp: Path) -> tuple[Path, Path, Path]:
    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp,
                       timeout=60)

    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=bus test CA")
    ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
         "nats.key", "-out", "nats.csr", "-subj", "/CN=localhost")
    (tmp / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ossl("x509", "-req", "-in", "nats.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "nats.crt", "-days", "2", "-extfile", "san.ext")
    return tmp / "ca.crt", tmp / "nats.crt", tmp / "nats.key"


def test_credentials_from_a_file_tls_and_no_anonymous_publish(tmp_path):
    ca, cert, key = _make_ca(tmp_path)
    srv = with_example_auth(NatsServer(tmp_path / "nats", "n1", extra=f"""
tls {{ cert_file: "{cert}", key_file: "{key}", timeout: 2 }}
""")).start()
    creds = tmp_path / "serve.creds"
    creds.write_text(f"{SERVE_USER}:{SERVE_PASSWORD}\n")
    creds.chmod(0o600)
    wrong = tmp_path / "wrong.creds"
    wrong.write_text(f"{SERVE_USER}:not-the-password\n")
    try:
        r = _serve("--state", str(tmp_path / "s.json"), "--bus", srv.url, "--bus-creds",
                   str(wrong), "--bus-ca", str(ca))
        assert r.returncode == 2 and "Authorization Violation" in r.stderr, r.stderr
        assert "not-the-password" not in r.stderr
        r = _serve("--state", str(tmp_path / "s.json"), "--bus", srv.url, "--bus-creds",
                   str(creds))
        assert r.returncode == 2 and "cannot reach the bus" in r.stderr  # no CA: untrusted
        rep = replica(tmp_path, "r0", srv.url, "--bus-creds", str(creds), "--bus-ca", str(ca))
        rep.start()
        reader = AlertSubscriber(srv.url, user=READER_USER, password=READER_PASSWORD,
                                 tls=__import__("ssl").create_default_context(cafile=str(ca)))
        try:
            events = fleet_events()
            for b in batches_of(events):
                assert post(rep.url, b, gz=True)[0] == 200
            assert wait_for(lambda: len(reader.messages) >= 5, 30)
            assert rep.stop() == 0
        finally:
            rep.kill()
            reader.close()
        assert SERVE_PASSWORD not in rep.log.read_text()
        # Nobody publishes without credentials, and the alert reader cannot publish.
        import ssl as _ssl

        tls = _ssl.create_default_context(cafile=str(ca))
        errors: list[str] = []

        async def note(e: Exception) -> None:
            errors.append(str(e))

        with pytest.raises(Exception):  # noqa: B017 - nats-py's error for a refused connect
            run_client(srv.url, _publish_event, tls=tls, allow_reconnect=False, error_cb=note)
        assert any("Authorization Violation" in e for e in errors), errors
        errors.clear()
        # The alert reader's publish is refused by the server (a timeout on the client,
        # the violation reported to its error callback).
        with pytest.raises(TimeoutError):
            run_client(srv.url, _publish_event, tls=tls, user=READER_USER,
                       password=READER_PASSWORD, error_cb=note)
        assert any("permissions violation" in e.lower() for e in errors), errors
    finally:
        srv.stop()


async def _publish_event(_nc, js) -> None:
    await js.publish("imdswatch.events", b"{}", timeout=2)


# -- hostile and unusual content on the bus ---------------------------------------------------
def test_corrupt_checkpoint_and_foreign_messages_are_skipped(tmp_path, nats_server):
    events = fleet_events()
    batches = batches_of(events)
    half = len(batches) // 2
    first = replica(tmp_path, "r0", nats_server.url).start()
    try:
        the_leader([first])
        for b in batches[:half]:
            assert post(first.url, b, gz=True)[0] == 200
        sent = sum(b.count(b"\n") + 1 for b in batches[:half])
        assert wait_for(lambda: all_scored([first], nats_server.url, sent), 90)
        assert first.stop() == 0
    finally:
        first.kill()

    async def vandalise(_nc, js) -> int:
        last = await js.get_msg("IMDSWATCH_LEDGER", subject="imdswatch.ledger.checkpoint")
        good = json.loads(last.data)
        obs = await js.object_store("IMDSWATCH_CKPT")
        info = await obs.put("state-bogus", b"\x1f\x8b not a state at all")
        await js.publish("imdswatch.ledger.checkpoint", json.dumps({
            **good, "state": "state-bogus", "digest": info.digest, "previous": last.seq,
        }).encode())
        # Something else on the events subject, and a batch whose lines are not events.
        await js.publish("imdswatch.events", b"hello from another program")
        await js.publish("imdswatch.events", b"{not json\n\x00\xff",
                         headers={"Imdswatch-Batch": "ndjson-1"})
        return good["position"]

    run_client(nats_server.url, vandalise)
    second = replica(tmp_path, "r1", nats_server.url).start()
    try:
        the_leader([second])
        for b in batches[half:]:
            assert post(second.url, b, gz=True)[0] == 200
        assert wait_for(lambda: all_scored([second], nats_server.url, len(events)), 90)
        assert second.metric("imdswatch_fleet_checkpoint_fallbacks_total") == 1
        assert second.metric("imdswatch_fleet_bus_skipped_messages_total",
                             reason="foreign") == 1
        assert second.metric("imdswatch_fleet_bus_skipped_messages_total",
                             reason="corrupt") == 1
        assert second.stop() == 0
    finally:
        second.kill()
    text = second.log.read_text()
    assert "checkpoint state-bogus" in text and "using the one before it" in text
    assert "Traceback" not in text
    assert json.loads(second.state.read_text())["events_learned"] == len(events)
    want = replay_alerts(tmp_path, events, *LEARN)
    assert comparable([json.loads(x) for x in ledger_alerts(nats_server.url)]) == \
        comparable(want)


def test_batches_split_under_max_payload_and_resent_past_the_window(tmp_path):
    """A body larger than the server's max_payload goes as several messages whose ids
    repeat on a re-send (duplicates); past the stream's duplicate window the copy is stored
    again and the scoring replica drops its events by event.id: scored once."""
    srv = NatsServer(tmp_path / "nats", "n1", extra="max_payload: 64KB").start()

    async def short_window(_nc, js) -> None:
        from nats.js import api

        await js.add_stream(api.StreamConfig(
            name="IMDSWATCH", subjects=["imdswatch.events"], duplicate_window=1.0,
            storage=api.StorageType.FILE, discard=api.DiscardPolicy.NEW))

    run_client(srv.url, short_window)
    events = fleet_events()[:2000]
    body = b"\n".join(events)
    assert len(body) > 8 * 64 * 1024
    r = replica(tmp_path, "r0", srv.url).start()
    try:
        the_leader([r])
        status, _h, answer = post(r.url, body, gz=True)
        assert status == 200 and json.loads(answer)["accepted"] == len(events)

        async def count(_nc, js) -> int:  # messages ever stored (checkpoints trim them)
            return (await js.stream_info("IMDSWATCH")).state.last_seq

        messages = run_client(srv.url, count)
        assert messages >= 8
        status, _h, answer = post(r.url, body, gz=True)  # within the window: duplicates
        assert status == 200 and json.loads(answer)["duplicates"] == len(events)
        assert run_client(srv.url, count) == messages
        time.sleep(1.5)  # past the window: stored again, dropped by the scorer
        status, _h, answer = post(r.url, body, gz=True)
        assert status == 200 and json.loads(answer)["accepted"] == len(events)
        assert run_client(srv.url, count) == 2 * messages
        assert wait_for(lambda: r.metric("imdswatch_ingest_events_total",
                                         result="duplicate") >= 2 * len(events), 60)
        assert wait_for(lambda: all_scored([r], srv.url, len(events)), 90)
        assert r.stop() == 0
    finally:
        r.kill()
        srv.stop()
    assert json.loads(r.state.read_text())["events_learned"] == len(events)


def test_credentials_file_forms_and_an_nkey_seed(tmp_path):
    """What --bus-creds FILE may hold, told apart without echoing it; an nkey seed file
    authenticates against a server that knows only the public key."""
    import nkeys

    from fleet.nats_bridge import BusError, read_credentials

    def creds(text: str) -> dict:
        path = tmp_path / "c"
        path.write_text(text)
        return read_credentials(str(path))

    assert creds("serve:s3cret\n") == {"user": "serve", "password": "s3cret"}
    assert creds("tok-123\n") == {"token": "tok-123"}
    jwt = ("-----BEGIN NATS USER JWT-----\neyJ0eXAi\n------END NATS USER JWT------\n"
           "-----BEGIN USER NKEY SEED-----\nSUAM\n------END USER NKEY SEED------\n")
    assert creds(jwt) == {"user_credentials": str(tmp_path / "c")}
    for bad, why in (("a\nb\n", "expected"), ("serve:\n", "empty part"),
                     (jwt.split("-----BEGIN USER")[0], "without its nkey seed")):
        with pytest.raises(BusError, match=why) as err:
            creds(bad)
        assert "serve:" not in str(err.value) and "eyJ0" not in str(err.value)
    seed = nkeys.encode_seed(bytes(range(32)), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(seed).public_key.decode()
    (tmp_path / "serve.nk").write_bytes(seed + b"\n")
    assert creds(seed.decode()) == {"nkeys_seed": str(tmp_path / "c")}
    srv = NatsServer(tmp_path / "nats", "n1",
                     extra=f'authorization {{ users: [ {{ nkey: "{public}" }} ] }}').start()
    try:
        r = replica(tmp_path, "r0", srv.url, "--bus-creds", str(tmp_path / "serve.nk"))
        r.start()
        try:
            assert the_leader([r]) is r
            assert r.stop() == 0
        finally:
            r.kill()
        assert seed.decode() not in r.log.read_text()
    finally:
        srv.stop()


# -- the fleet's policy on the bus ---------------------------------------------------------------
POLICY = '[policy]\ndefault = "deny"\n\n[[rule]]\nname = "ssm"\nprocess = "amazon-ssm-agent"\n'


def policy_of(r: ServeProcess, etag: str | None = None) -> tuple[int, str | None, bytes]:
    req = urllib.request.Request(f"{r.url}/v1/policy",
                                 headers={"If-None-Match": etag} if etag else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers["ETag"], resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["ETag"], e.read()


def test_the_policy_outlives_the_scoring_replica(tmp_path, nats_server):
    """Replicas sharing one policy file (one ConfigMap) publish it with the same ETag (a hash
    of its bytes), so an agent sent to whichever replica answers after the scoring one is
    SIGKILLed sees it unchanged (304) and keeps it; a corrupt file on the survivor leaves
    the previous policy published and counts the refusal (ImdswatchPolicyStale fires)."""
    from fleet.policy_fetch import FleetPolicy

    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    reps = [replica(tmp_path, f"r{i}", nats_server.url, "--policy", str(policy)).start()
            for i in range(2)]
    try:
        lead = the_leader(reps)
        follower = next(r for r in reps if r is not lead)
        status, etag, body = policy_of(lead)
        assert status == 200 and etag and body.decode() == POLICY
        assert policy_of(follower)[:3] == (200, etag, body)
        spool = tmp_path / "spool"
        agent_view = FleetPolicy(lead.url, str(spool), None, None, ())
        pol, source = agent_view.initial()
        assert source == "the fleet scorer" and pol.rules[0].name == "ssm"
        agent_view.close()

        lead.kill()
        assert the_leader([follower]) is follower
        assert policy_of(follower)[:3] == (200, etag, body)
        assert policy_of(follower, etag)[0] == 304
        after = FleetPolicy(follower.url, str(spool), None, None, ())
        after.etag = agent_view.etag
        assert after._fetch() is None and after.take() == (None, [])  # unchanged: kept
        after.close()

        policy.write_text(POLICY + "[[rule]]\nname = 3\n")  # not a policy any more
        # The file is read again on a request, at most once a second.
        assert wait_for(lambda: policy_of(follower)[1] == etag and follower.metric(
            "imdswatch_fleet_policy_refused_total") == 1, 10)
        assert policy_of(follower)[:3] == (200, etag, body)
        assert follower.metric("imdswatch_fleet_leader") == 1
    finally:
        kill_all(reps)
