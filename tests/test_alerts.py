# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them. Real connections happen only inside a test's own network namespace
# (netns, tests/netns_fixtures.py).
"""Alerts NDJSON (contract §2): fields, redaction, event time, one flushed line per alert."""

import io
import json

import orjson
from helpers.imdsw_scenario import attack_event, baseline_events

from exporters.alerts import AlertWriter, build_alert
from exporters.timestamps import rfc3339_millis
from intake.parser import event_from_ecs
from scoring.endpoints import BUILTIN_ENDPOINTS
from scoring.scorer import Outcome, Scorer
from scoring.settings import ScorerSettings

DOC = {
    "@timestamp": "2024-05-01T12:00:00.123456Z",
    "event": {"id": "ev-1", "kind": "event"},
    "destination": {"ip": "169.254.169.254", "port": 80},
    "process": {
        "name": "curl", "pid": 4242, "executable": "/usr/bin/curl",
        "command_line": 'curl -H "X-aws-ec2-metadata-token: AQAEsecret" '
                        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "args": ["curl", "-H", "X-aws-ec2-metadata-token: AQAEsecret"],
        "parent": {"name": "bash", "pid": 1, "command_line": "bash -c vault --token=s.abc"},
    },
    "user": {"name": "www-data", "id": "33"},
    "host": {"name": "node-1"},
    "container": {"id": "c0ffee", "image": {"name": "nginx:1.25"}},
    "orchestrator": {"namespace": "web", "resource": {"name": "web-7d9f"}},
    "cloud": {"provider": "aws"},
    "unrelated": {"field": 1},
}


def outcome_for(doc: dict, **kw) -> Outcome:
    """A real scorer Outcome with chosen verdict fields (severity follows the score)."""
    out = Outcome(event_from_ecs(doc), BUILTIN_ENDPOINTS[0])
    fields = dict(
        score=87.6543,
        detector="rare_process",
        rule_name="Unusual Linux Process Calling the Metadata Service",
        reason="curl has never called the metadata service on 3 hosts in 2 days",
        entity="curl",
        scores={"rare_process": 87.6543, "rare_user": 12.04},
        alert=True,
    )
    fields.update(kw)
    for key, value in fields.items():
        setattr(out, key, value)
    return out


def test_alert_fields_follow_the_contract() -> None:
    alert = build_alert(outcome_for(DOC))
    assert alert["@timestamp"] == "2024-05-01T12:00:00.123Z"
    assert alert["event"] == {"kind": "alert", "id": "ev-1"}
    assert alert["rule"]["name"] == "Unusual Linux Process Calling the Metadata Service"
    assert alert["anomaly"]["score"] == 87.7
    assert alert["anomaly"]["detector"] == "rare_process"
    assert alert["anomaly"]["reason"].startswith("curl has never")
    assert alert["anomaly"]["severity"] == "high"
    assert alert["anomaly"]["scores"] == {"rare_process": 87.7, "rare_user": 12.0}
    assert alert["imdswatch"] == {"endpoint": "imds", "scored_by": "agent"}
    assert build_alert(outcome_for(DOC), "fleet")["imdswatch"]["scored_by"] == "fleet"
    for key in ("user", "host", "container", "orchestrator", "destination"):
        assert alert[key] == DOC[key]
    assert alert["process"]["executable"] == "/usr/bin/curl"
    assert "unrelated" not in alert and "cloud" not in alert


def test_command_lines_and_args_are_redacted_without_touching_the_event() -> None:
    outcome = outcome_for(DOC)
    alert = build_alert(outcome)
    assert "AQAEsecret" not in json.dumps(alert)
    assert "s.abc" not in alert["process"]["parent"]["command_line"]
    assert "[REDACTED]" in alert["process"]["command_line"]
    assert "security-credentials" in alert["process"]["command_line"]
    # The scorer's copy of the document is left intact (deep copy, not a shared dict).
    assert "AQAEsecret" in outcome.event.doc["process"]["command_line"]


def test_event_without_id_or_optional_sections() -> None:
    doc = {"@timestamp": 1714564800, "destination": {"ip": "169.254.169.254"},
           "process": {"name": "python3"}}
    alert = build_alert(outcome_for(doc, scores={}, entity=""))
    assert alert["event"] == {"kind": "alert"}
    assert alert["@timestamp"] == "2024-05-01T12:00:00.000Z"
    assert set(alert) == {"@timestamp", "event", "rule", "anomaly", "process", "destination",
                          "imdswatch"}


def test_timestamp_formatting() -> None:
    assert rfc3339_millis(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339_millis(1714564800.9999) == "2024-05-01T12:00:00.999Z"


def test_writer_on_text_stream_flushes_each_line() -> None:
    class CountingText(io.StringIO):
        flushes = 0

        def flush(self) -> None:
            self.flushes += 1
            super().flush()

    stream = CountingText()
    writer = AlertWriter(stream)
    writer.write(outcome_for(DOC))
    assert stream.flushes == 1
    writer.write(outcome_for(DOC, score=99.0))
    writer.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and stream.flushes >= 2
    assert [json.loads(line)["anomaly"]["score"] for line in lines] == [87.7, 99.0]
    assert not stream.closed  # a stream it did not open is not closed


def test_writer_on_binary_stream() -> None:
    stream = io.BytesIO()
    AlertWriter(stream).write(outcome_for(DOC))
    assert orjson.loads(stream.getvalue().splitlines()[0])["event"]["kind"] == "alert"


def test_writer_on_path_appends_and_is_readable_while_open(tmp_path) -> None:
    path = tmp_path / "alerts.ndjson"
    with AlertWriter(path) as writer:
        writer.write(outcome_for(DOC))
        # Flushed per alert: a tailing reader sees the line before close().
        assert len(path.read_text().splitlines()) == 1
    with AlertWriter(str(path)) as writer:
        writer.write(outcome_for(DOC))
    assert len(path.read_text().splitlines()) == 2


def test_alert_from_the_real_scorer() -> None:
    scorer = Scorer(ScorerSettings(learning_period=600))
    outcomes = [scorer.process(event_from_ecs(d)) for d in [*baseline_events(), attack_event()]]
    alerts = [build_alert(o) for o in outcomes if o is not None and o.alert]
    assert len(alerts) == 1
    (alert,) = alerts
    assert alert["rule"]["name"] == "Unusual Linux Process Calling the Metadata Service"
    assert alert["event"] == {"kind": "alert", "id": "attack-1"}
    assert alert["orchestrator"]["resource"]["name"] == "shop-7d9f"
    assert alert["anomaly"]["score"] >= 50 and "curl" in alert["anomaly"]["reason"]
    assert "AQAEsecretvalue" not in orjson.dumps(alert).decode()
    assert alert["@timestamp"].endswith("Z")


def test_writer_can_truncate(tmp_path) -> None:
    path = tmp_path / "alerts.ndjson"
    path.write_text("old line\n")
    with AlertWriter(path, append=False) as writer:
        writer.write(outcome_for(DOC))
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("{")
