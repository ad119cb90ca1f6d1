# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them. Real connections happen only inside a test's own network namespace
# (netns, tests/netns_fixtures.py).
"""The data contract end to end through the real `imdswatch replay` command
(/work/shared/contract/README.md §1-§3)."""

import copy
import gzip
import json
import random
import re
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
from helpers_events import (
    DAY,
    HOUR,
    MINUTE,
    T0,
    ev,
    fleet_events,
    ndjson_bytes,
    to_ecs,
    unique_times,
    write_ndjson,
)

from intake.parser import event_from_ecs
from scoring.scorer import Scorer
from scoring.settings import ScorerSettings

ROOT = Path(__file__).resolve().parent.parent
IMDSWATCH = ROOT / ".venv" / "bin" / "imdswatch"
ATTACK_AT = T0 + 1.5 * DAY
TOKEN = "AQAEAHfK1x9zSECRETTOKEN=="
CMD = ('curl -s -H "X-aws-ec2-metadata-token: ' + TOKEN + '" '
       "http://169.254.169.254/latest/meta-data/iam/security-credentials/")


def attack_events():
    t = ATTACK_AT
    return [
        ev(t, "xmrig", exe="/tmp/.x/xmrig", user="root", parent="bash", host="node-3",
           event_id="attack-rare-process", pid=31337),
        ev(t + 10 * MINUTE, "amazon-ssm-agent", exe="/tmp/amazon-ssm-agent", parent="systemd",
           host="node-2", event_id="attack-masquerade"),
        ev(t + 20 * MINUTE, "curl", exe="/usr/bin/curl", user="www-data", parent="bash",
           host="node-1", command_line=CMD, event_id="attack-webshell"),
        ev(t + 30 * MINUTE, "python3", exe="/usr/bin/python3", user="app", parent="nginx",
           image="registry.local/shop/api:2.3.1", namespace="shop", host="node-0",
           event_id="attack-parent"),
        ev(t + 40 * MINUTE, "python3", exe="/usr/bin/python3", user="app",
           parent="supervisord", image="docker.io/evil/miner:1", namespace="default",
           host="node-0", event_id="attack-container"),
        # IPv6 IMDS and the ECS task endpoint.
        ev(t + 50 * MINUTE, "socat", exe="/usr/bin/socat", dst_ip="fd00:ec2::254",
           host="node-2", event_id="attack-v6"),
        ev(t + 60 * MINUTE, "nc", exe="/usr/bin/nc", dst_ip="169.254.170.2", host="node-1",
           event_id="attack-ecs"),
    ]


ATTACK_IDS = {e.event_id for e in attack_events()}
# During the default one-day learning period: an alert only with a shorter one.
EARLY_ATTACK = ev(T0 + 0.9 * DAY, "kinsing", exe="/tmp/kinsing", host="node-2",
                  event_id="attack-early")


def off_target_events():
    t = T0 + 0.7 * DAY
    return [
        ev(t, "curl", dst_ip="169.254.169.253", dst_port=53, event_id="off-dns"),
        ev(t + 1, "chronyd", dst_ip="169.254.169.123", dst_port=123, event_id="off-ntp"),
        ev(t + 2, "curl", dst_ip="10.0.0.1", dst_port=443, event_id="off-lan"),
        ev(t + 3, "dig", dst_ip="168.63.129.16", dst_port=53, event_id="off-azure-dns"),
        ev(ATTACK_AT + 5, "evil", exe="/tmp/evil", dst_ip="8.8.8.8", event_id="off-attack"),
    ]


def build_trace():
    events = fleet_events(hosts=4, days=2)
    for i, e in enumerate(events):
        e.event_id = f"ev-{i}"
    events = unique_times(events + attack_events() + off_target_events() + [EARLY_ATTACK])
    return [to_ecs(e) for e in events]


@pytest.fixture(scope="module")
def docs():
    return build_trace()


@pytest.fixture(scope="module")
def files(docs, tmp_path_factory):
    d = tmp_path_factory.mktemp("trace")
    plain = write_ndjson(d / "events.ndjson", docs)
    gz = write_ndjson(d / "events.ndjson.gz", docs)
    return plain, gz


def replay(*args, input=None, check=True):
    r = subprocess.run([str(IMDSWATCH), "replay", *map(str, args)], input=input,
                       capture_output=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr.decode()
    return r


def alerts_of(r):
    lines = r.stdout.decode().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def ids(alerts):
    return sorted(a["event"]["id"] for a in alerts)


def summary_number(stderr, label):
    if label == "lines":
        m = re.search(r"imdswatch replay: (\d+) lines", stderr)
    else:
        m = re.search(re.escape(label) + r":?\s*(\d+)", stderr)
    assert m, f"{label!r} not in summary:\n{stderr}"
    return int(m.group(1))


@pytest.fixture(scope="module")
def baseline(files):
    """The default replay of the plain file with a one-day learning period."""
    r = replay(files[0], "--learning-period", "1d")
    return r, alerts_of(r)


# -- input forms ------------------------------------------------------------------------------

def test_plain_file_alerts_on_every_attack_and_nothing_else(baseline):
    _, alerts = baseline
    assert set(ids(alerts)) == ATTACK_IDS
    assert len(alerts) == len(ATTACK_IDS)


def test_each_attack_names_its_detector(baseline):
    _, alerts = baseline
    by_id = {a["event"]["id"]: a["anomaly"]["detector"] for a in alerts}
    assert by_id["attack-rare-process"] == "rare_process"
    assert by_id["attack-masquerade"] == "rare_executable"
    assert by_id["attack-webshell"] == "rare_process_user"
    assert by_id["attack-parent"] == "rare_parent"
    assert by_id["attack-container"] == "rare_container"


def test_gzip_input_gives_the_same_alerts(baseline, files):
    r = replay(files[1], "--learning-period", "1d")
    assert r.stdout == baseline[0].stdout


def test_gzip_recognised_without_the_suffix(baseline, files, tmp_path):
    renamed = tmp_path / "events.bin"
    renamed.write_bytes(files[1].read_bytes())
    assert replay(renamed, "--learning-period", "1d").stdout == baseline[0].stdout


@pytest.mark.parametrize("which", [0, 1])
def test_stdin_gives_the_same_alerts(baseline, files, which):
    r = replay("-", "--learning-period", "1d", input=files[which].read_bytes())
    assert r.stdout == baseline[0].stdout


def test_output_file(baseline, files, tmp_path):
    out = tmp_path / "alerts.ndjson"
    r = replay(files[0], "--learning-period", "1d", "--output", out)
    assert r.stdout == b""
    assert out.read_bytes() == baseline[0].stdout


def test_crlf_line_endings(baseline, docs, tmp_path):
    path = tmp_path / "crlf.ndjson"
    path.write_bytes(b"".join(orjson.dumps(d) + b"\r\n" for d in docs))
    r = replay(path, "--learning-period", "1d")
    assert ids(alerts_of(r)) == ids(baseline[1])
    assert summary_number(r.stderr.decode(), "malformed lines") == 0


def test_last_line_without_newline(docs, tmp_path):
    path = tmp_path / "nonl.ndjson"
    path.write_bytes(ndjson_bytes(docs).rstrip(b"\n"))
    r = replay(path, "--learning-period", "1d")
    assert summary_number(r.stderr.decode(), "lines") == len(docs)


# -- alert documents (contract §2) --------------------------------------------------------------

def test_alert_fields(baseline, docs):
    _, alerts = baseline
    source = {d["event"]["id"]: d for d in docs if "event" in d}
    for a in alerts:
        doc = source[a["event"]["id"]]
        # @timestamp is the event time, not the wall clock.
        alert_ts = datetime.fromisoformat(a["@timestamp"].replace("Z", "+00:00")).timestamp()
        event_ts = datetime.fromisoformat(doc["@timestamp"].replace("Z", "+00:00")).timestamp()
        assert alert_ts == pytest.approx(event_ts, abs=0.001)
        assert a["@timestamp"].endswith("Z")
        assert a["event"]["kind"] == "alert"
        assert isinstance(a["rule"]["name"], str) and a["rule"]["name"]
        an = a["anomaly"]
        assert 50 <= an["score"] <= 100
        assert re.fullmatch(r"rare_[a-z_]+", an["detector"])
        assert isinstance(an["reason"], str) and len(an["reason"]) > 20
        assert re.search(r"\d", an["reason"])
        assert "\n" not in an["reason"]
        for key in ("user", "host", "container", "orchestrator", "destination"):
            if key in doc:
                assert a[key] == doc[key], key
            else:
                assert key not in a
        expected_process = copy.deepcopy(doc["process"])
        expected_process.pop("command_line", None)
        got_process = dict(a["process"])
        got_process.pop("command_line", None)
        assert got_process == expected_process


def test_rule_names(baseline):
    _, alerts = baseline
    rules = {a["anomaly"]["detector"]: a["rule"]["name"] for a in alerts}
    assert rules["rare_process"] == "Unusual Linux Process Calling the Metadata Service"
    assert len(set(rules.values())) == len(rules)  # each detector its own rule


def test_reason_carries_the_numbers(baseline):
    _, alerts = baseline
    by_id = {a["event"]["id"]: a for a in alerts}
    reason = by_id["attack-rare-process"]["anomaly"]["reason"]
    assert "xmrig" in reason and "on 4 hosts" in reason and "day" in reason


def test_command_line_tokens_are_redacted(baseline):
    r, alerts = baseline
    assert TOKEN.encode() not in r.stdout
    webshell = next(a for a in alerts if a["event"]["id"] == "attack-webshell")
    cmd = webshell["process"]["command_line"]
    assert "[REDACTED]" in cmd
    assert "X-aws-ec2-metadata-token" in cmd
    assert "http://169.254.169.254/latest/meta-data/iam/security-credentials/" in cmd


def test_ipv6_and_ecs_endpoints_are_watched(baseline):
    _, alerts = baseline
    by_id = {a["event"]["id"]: a for a in alerts}
    assert by_id["attack-v6"]["destination"]["ip"] == "fd00:ec2::254"
    assert by_id["attack-ecs"]["destination"]["ip"] == "169.254.170.2"


# -- threshold and learning period --------------------------------------------------------------

def test_threshold_defaults_to_50(baseline, files):
    r = replay(files[0], "--learning-period", "1d", "--threshold", "50")
    assert r.stdout == baseline[0].stdout


def test_lower_threshold_never_yields_fewer_alerts(baseline, files):
    r = replay(files[0], "--learning-period", "1d", "--threshold", "20")
    assert set(ids(baseline[1])) <= set(ids(alerts_of(r)))


def test_higher_threshold_yields_fewer_alerts(baseline, files):
    _, alerts = baseline
    threshold = sorted(a["anomaly"]["score"] for a in alerts)[len(alerts) // 2] + 0.05
    r = replay(files[0], "--learning-period", "1d", "--threshold", f"{threshold:.2f}")
    high = alerts_of(r)
    assert 0 < len(high) < len(alerts)
    assert set(ids(high)) < set(ids(alerts))
    assert all(a["anomaly"]["score"] >= threshold - 0.05 for a in high)


@pytest.mark.parametrize("value", ["101", "-1", "high"])
def test_bad_threshold_exits_2(files, value):
    r = replay(files[0], "--threshold", value, check=False)
    assert r.returncode == 2
    assert b"threshold" in r.stderr


def test_learning_period_longer_than_the_trace_means_no_alerts(files):
    r = replay(files[0], "--learning-period", "3d")
    assert alerts_of(r) == []
    stderr = r.stderr.decode()
    assert "learning: yes" in stderr


def test_short_learning_period_alerts_earlier(baseline, files):
    assert "attack-early" not in ids(baseline[1])
    r = replay(files[0], "--learning-period", "12h")
    early = alerts_of(r)
    assert "attack-early" in ids(early)
    assert set(ids(baseline[1])) <= set(ids(early))
    assert "learning: done" in r.stderr.decode()


def test_default_learning_period_is_a_day(baseline, files):
    assert replay(files[0]).stdout == baseline[0].stdout


@pytest.mark.parametrize("value", ["soon", "3 days", "-1d"])
def test_bad_learning_period_exits_2(files, value):
    r = replay(files[0], "--learning-period", value, check=False)
    assert r.returncode == 2
    assert b"Traceback" not in r.stderr


# -- state ------------------------------------------------------------------------------------

def test_state_load_and_save_continues_a_replay(baseline, docs, tmp_path):
    cut = T0 + 1.25 * DAY
    first = [d for d in docs if _ts(d) < cut]
    second = [d for d in docs if _ts(d) >= cut]
    a = write_ndjson(tmp_path / "first.ndjson", first)
    b = write_ndjson(tmp_path / "second.ndjson.gz", second)
    state = tmp_path / "model.json.gz"
    r1 = replay(a, "--learning-period", "1d", "--state", state)
    assert state.exists() and state.stat().st_size > 0
    r2 = replay(b, "--learning-period", "1d", "--state", state)
    # Together they alert exactly as the whole trace did.
    assert ids(alerts_of(r1) + alerts_of(r2)) == ids(baseline[1])
    assert [a["anomaly"] for a in alerts_of(r2)] == [
        a["anomaly"] for a in baseline[1] if _alert_ts(a) >= cut]
    # Without the state, the second part alone is a cold start: still learning, blind.
    cold = replay(b, "--learning-period", "1d")
    assert alerts_of(cold) == []


def test_state_file_that_is_corrupt_exits_2(files, tmp_path):
    state = tmp_path / "broken.json"
    state.write_bytes(b"{ this is not a state")
    r = replay(files[0], "--state", state, check=False)
    assert r.returncode == 2
    assert b"broken.json" in r.stderr
    assert state.read_bytes() == b"{ this is not a state"  # not overwritten


# -- malformed and off-target input -------------------------------------------------------------

BAD_LINES = [
    b"this is not json",
    b'{"@timestamp": "2024-05-01T01:00:00Z", "destination": {"ip": "169.254.169.254"}}',
    b"[1, 2, 3]",
    b'{"@timestamp": "2024-05-01T01:00:00", "destination": {"ip": "169.254.169.254"}, '
    b'"process": {"name": "curl"}}',
    b'{"process": {"name": "curl"}, "destination": {"ip": "169.254.169.254"}}',
    b'{"@timestamp": "2024-05-01T01:00:00Z", "destination": {"ip": "169.254.169.254", '
    b'"port": "http"}, "process": {"name": "curl"}}',
    b'{"truncated": ',
]


def test_malformed_lines_are_counted_reported_and_never_fatal(baseline, docs, tmp_path):
    lines = [orjson.dumps(d) for d in docs]
    positions = []
    for k, bad in enumerate(BAD_LINES):
        pos = 100 + k * 997
        lines.insert(pos, bad)
        positions.append(pos + 1)  # 1-based line numbers
    lines.insert(50, b"")  # a blank line is not malformed
    positions = [p + 1 if p > 50 else p for p in positions]
    path = tmp_path / "dirty.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    r = replay(path, "--learning-period", "1d")
    assert r.returncode == 0
    stderr = r.stderr.decode()
    for p in positions:
        assert re.search(rf"line {p}\b", stderr), (p, stderr)
    assert summary_number(stderr, "malformed lines") == len(BAD_LINES)
    assert ids(alerts_of(r)) == ids(baseline[1])
    # The reason names what is wrong.
    assert "process.name" in stderr and "JSON" in stderr and "time zone" in stderr


def test_many_malformed_lines(tmp_path):
    lines = [b"garbage %d" % i for i in range(60)] + [
        orjson.dumps(to_ecs(ev(T0, "kubelet", exe="/usr/bin/kubelet")))]
    path = tmp_path / "garbage.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    r = replay(path)
    stderr = r.stderr.decode()
    assert summary_number(stderr, "malformed lines") == 60
    assert summary_number(stderr, "metadata events scored") == 1
    assert "line 1" in stderr


def test_invalid_utf8_is_malformed_not_fatal(tmp_path):
    good = orjson.dumps(to_ecs(ev(T0, "kubelet", exe="/usr/bin/kubelet")))
    path = tmp_path / "latin1.ndjson"
    path.write_bytes(b'{"@timestamp": 1714521600, "process": {"name": "caf\xe9"}}\n' + good + b"\n")
    r = replay(path)
    assert summary_number(r.stderr.decode(), "malformed lines") == 1
    assert summary_number(r.stderr.decode(), "metadata events scored") == 1


def test_off_target_events_are_counted_as_skipped(baseline, docs):
    stderr = baseline[0].stderr.decode()
    assert summary_number(stderr, "skipped (not a metadata endpoint)") == len(off_target_events())
    assert summary_number(stderr, "metadata events scored") == len(docs) - len(
        off_target_events())
    assert summary_number(stderr, "malformed lines") == 0


def test_summary_on_stderr(baseline, docs):
    r, alerts = baseline
    stderr = r.stderr.decode()
    assert "imdswatch replay" in stderr
    assert summary_number(stderr, "lines") == len(docs)
    assert re.search(rf"alerts: {len(alerts)}\b", stderr)
    assert "from 4 hosts" in stderr
    assert b"imdswatch replay" not in r.stdout  # alerts only on stdout


# -- unusable input ---------------------------------------------------------------------------

def test_missing_file_exits_2(tmp_path):
    r = replay(tmp_path / "absent.ndjson", check=False)
    assert r.returncode == 2
    assert b"absent.ndjson" in r.stderr
    assert b"Traceback" not in r.stderr


def test_directory_exits_2(tmp_path):
    r = replay(tmp_path, check=False)
    assert r.returncode == 2
    assert b"Traceback" not in r.stderr


@pytest.mark.parametrize("damage", ["corrupted", "truncated"])
def test_corrupt_gzip_exits_2(docs, tmp_path, damage):
    path = tmp_path / "broken.ndjson.gz"
    data = gzip.compress(ndjson_bytes(docs[:2000]))
    if damage == "corrupted":
        data = data[:10] + b"\x00" * 64 + data[74:]
    else:
        data = data[: len(data) // 2]
    path.write_bytes(data)
    r = replay(path, check=False)
    assert r.returncode == 2, r.stderr.decode()[-300:]
    assert b"broken.ndjson.gz" in r.stderr
    assert b"Traceback" not in r.stderr


def test_empty_input(tmp_path):
    path = tmp_path / "empty.ndjson"
    path.write_bytes(b"")
    r = replay(path)
    assert r.stdout == b""
    assert summary_number(r.stderr.decode(), "metadata events scored") == 0


# -- event-time order -------------------------------------------------------------------------

def _ts(doc):
    return datetime.fromisoformat(doc["@timestamp"].replace("Z", "+00:00")).timestamp()


def _alert_ts(alert):
    return _ts(alert)


def jitter(docs, max_shift, seed=7):
    """Shuffle lines locally: each line moves by a random delay of up to `max_shift`
    seconds of event time, as interleaved per-host streams and batching shippers do."""
    rng = random.Random(seed)
    keyed = [(_ts(d) + rng.uniform(0, max_shift), i, d) for i, d in enumerate(docs)]
    keyed.sort()
    shuffled = [d for _, _, d in keyed]
    assert shuffled != docs
    return shuffled


def test_out_of_order_within_the_reorder_window_scores_in_event_time(baseline, docs,
                                                                      tmp_path):
    path = write_ndjson(tmp_path / "jittered.ndjson", jitter(docs, 5 * MINUTE))
    r = replay(path, "--learning-period", "1d")
    assert r.stdout == baseline[0].stdout
    assert re.search(r"out of order beyond the reorder window: 0\b", r.stderr.decode())


def test_out_of_order_beyond_the_window_is_counted_late(docs, tmp_path):
    shuffled = list(docs)
    # One host's batch arrives an hour late, after the rest.
    late = [d for d in shuffled if d.get("host", {}).get("name") == "node-0"
            and T0 + 6 * HOUR <= _ts(d) < T0 + 7 * HOUR]
    assert late
    rest = [d for d in shuffled if d not in late]
    cut = next(i for i, d in enumerate(rest) if _ts(d) >= T0 + 8 * HOUR)
    reordered = rest[:cut] + late + rest[cut:]
    path = write_ndjson(tmp_path / "late.ndjson", reordered)
    r = replay(path, "--learning-period", "1d", "--reorder-window", "10m")
    stderr = r.stderr.decode()
    assert summary_number(stderr, "arrived out of order beyond the reorder window") == len(late)
    assert summary_number(stderr, "metadata events scored") == len(docs) - len(
        off_target_events())
    # A window wide enough to hold them puts them back in order.
    r = replay(path, "--learning-period", "1d", "--reorder-window", "3h")
    assert summary_number(r.stderr.decode(),
                          "arrived out of order beyond the reorder window") == 0


def test_reverse_order_with_an_infinite_window(baseline, docs, tmp_path):
    path = write_ndjson(tmp_path / "reversed.ndjson", docs[::-1])
    r = replay(path, "--learning-period", "1d", "--reorder-window", "inf")
    assert r.stdout == baseline[0].stdout


# -- other ECS spellings of the same events --------------------------------------------------

def flatten(doc, prefix=""):
    out = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def test_flattened_documents_give_the_same_alerts(baseline, docs, tmp_path):
    path = write_ndjson(tmp_path / "flat.ndjson", [flatten(d) for d in docs])
    r = replay(path, "--learning-period", "1d")
    assert ids(alerts_of(r)) == ids(baseline[1])
    assert [a["anomaly"] for a in alerts_of(r)] == [a["anomaly"] for a in baseline[1]]


@pytest.mark.parametrize("form", ["epoch_s", "epoch_ms", "offset", "port_string"])
def test_other_spellings_give_the_same_alerts(baseline, docs, tmp_path, form):
    def respell(d):
        d = copy.deepcopy(d)
        ts = _ts(d)
        if form == "epoch_s":
            d["@timestamp"] = ts
        elif form == "epoch_ms":
            d["@timestamp"] = int(round(ts * 1000))
        elif form == "offset":
            plus2 = timezone(timedelta(hours=2))
            d["@timestamp"] = datetime.fromtimestamp(ts, tz=plus2).isoformat(
                timespec="milliseconds")
            assert d["@timestamp"].endswith("+02:00")
        elif "port" in d["destination"]:
            d["destination"]["port"] = str(d["destination"]["port"])
        return d

    path = write_ndjson(tmp_path / f"{form}.ndjson", [respell(d) for d in docs])
    r = replay(path, "--learning-period", "1d")
    assert [a["anomaly"] for a in alerts_of(r)] == [a["anomaly"] for a in baseline[1]]


# -- replay scores like the live agent --------------------------------------------------------

def test_replay_scores_exactly_as_the_scorer_does(baseline, docs):
    """The live agent feeds `event_from_ecs` documents to `Scorer.process` in arrival order;
    replay must alert on the same events with the same scores and reasons."""
    scorer = Scorer(ScorerSettings(learning_period=DAY))
    live = []
    for d in docs:
        out = scorer.process(event_from_ecs(d))
        if out is not None and out.alert:
            live.append((out.event.event_id, out.detector, round(out.score, 1), out.reason))
    replayed = [(a["event"]["id"], a["anomaly"]["detector"], a["anomaly"]["score"],
                 a["anomaly"]["reason"]) for a in baseline[1]]
    assert replayed == live
