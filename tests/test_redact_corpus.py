# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them.
"""A corpus of the ways a credential rides on a command line, checked where it could leave:
the alert line (the process's, the parent's command line and argument list, the reason and
the entity), the agent's log lines, and the metrics' labels. Each secret is a made-up value
of the real shape."""

import io
import logging
import shlex

import orjson
import pytest
from helpers_events import T0
from prometheus_client import CollectorRegistry, generate_latest

from exporters.alerts import AlertWriter, build_alert
from exporters.metrics import MetricsExporter
from exporters.redact import MASK, redact, redact_args
from scoring.events import Event
from scoring.scorer import Scorer
from scoring.settings import ScorerSettings

IMDSV2 = "AQAEAFfK1x9zAbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcdEFGHij=="
AKID = "AKIAQ3EGRVXW2EXAMPL3"
ASIA = "ASIAZ7TOKEN3EXAMPL3Q"
SECRET_KEY = "wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEKEYq"
JWT = ("eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.eyJzdWIiOiJzeXN0ZW06c2EiLCJleHAiOjF9."
       "c2lnbmF0dXJlLXZhbHVlLWhlcmUtMTIzNDU2Nzg5MA")
GHP = "ghp_R4nd0mT0k3nV4lu3F0rT3st1ngPurp0s3s0k"
GHO = "gho_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
GITHUB_PAT = "github_pat_11ABCDEFG0abcdefghijkl_MNOPQRSTUVWXyz0123456789abcdef"
VAULT = "hvs.CAESIJ1a2b3c4d5e6f7g8h9i0jKlMnOpQrStUvWx"
VAULT_LEGACY = "s.Xy7Zq2Wv9Ut4Rs6Po1Nm3Lk8"
BASIC_PW = "Sup3rS3cr3tPassw0rd"

# (the command line, the secret that must never leave)
CORPUS = [
    # the reviewer's case: an assignment inside a quoted shell string
    (f"bash -c 'TOKEN={IMDSV2} python3 steal.py'", IMDSV2),
    (f'sh -c "TOKEN={IMDSV2}; curl -H x-aws-ec2-metadata-token:$TOKEN 169.254.169.254"', IMDSV2),
    (f"bash -c 'MYVAR={IMDSV2} ./run'", IMDSV2),
    (f"bash -c 'X=1 K={SECRET_KEY} ./run'", SECRET_KEY),
    # env NAME=VALUE, export NAME=VALUE, any name
    (f"env TOKEN={IMDSV2} python3 steal.py", IMDSV2),
    (f"env -i HOME=/root CREDS={SECRET_KEY} ./x", SECRET_KEY),
    (f"bash -c 'export T={IMDSV2}; curl 169.254.169.254'", IMDSV2),
    (f"export AWS_SESSION_TOKEN={IMDSV2}", IMDSV2),
    # headers in any quoting, glued or apart
    (f"curl -H X-aws-ec2-metadata-token:{IMDSV2} http://169.254.169.254/", IMDSV2),
    (f'curl -H "X-aws-ec2-metadata-token: {IMDSV2}" http://169.254.169.254/', IMDSV2),
    (f"curl -H 'X-aws-ec2-metadata-token: {IMDSV2}' http://169.254.169.254/", IMDSV2),
    (f"curl --header=X-aws-ec2-metadata-token:{IMDSV2} http://169.254.169.254/", IMDSV2),
    (f"bash -c \"curl -H 'X-aws-ec2-metadata-token: {IMDSV2}' 169.254.169.254\"", IMDSV2),
    (f"curl -H 'Authorization: Bearer {JWT}' https://kubernetes.default", JWT),
    (f'wget --header="Authorization: token {GHP}" https://api.github.com', GHP),
    (f"python3 -c \"requests.get(u, headers={{'X-aws-ec2-metadata-token': '{IMDSV2}'}})\"",
     IMDSV2),
    # values shaped like credentials, wherever they stand
    (f"aws configure set aws_access_key_id {AKID}", AKID),
    (f"./upload {ASIA} {SECRET_KEY}", ASIA),
    (f"./upload {ASIA} {SECRET_KEY}", SECRET_KEY),
    (f"python3 x.py --key={SECRET_KEY}", SECRET_KEY),
    (f"curl {IMDSV2}", IMDSV2),
    (f"kubectl get pods --server https://k8s {JWT}", JWT),
    (f"git clone https://{GHO}@github.com/o/r", GHO),
    (f"git push https://x:{GITHUB_PAT}@github.com/o/r", GITHUB_PAT),
    (f"vault kv get -address=https://v secret/x {VAULT}", VAULT),
    (f"VAULT_ADDR=https://v vault read secret/x {VAULT_LEGACY}", VAULT_LEGACY),
    # basic-auth userinfo in URLs, with and without a scheme's quoting
    (f"curl https://admin:{BASIC_PW}@registry.local/v2/", BASIC_PW),
    (f"curl 'https://admin:{BASIC_PW}@registry.local/v2/'", BASIC_PW),
    (f"pip install --index-url=https://u:{BASIC_PW}@pypi.local/simple x", BASIC_PW),
]


def _event(cmd: str, parent_cmd: str) -> Event:
    doc = {
        "@timestamp": "2024-05-01T00:00:00.000Z",
        "process": {
            "name": "curl", "pid": 4242, "executable": "/usr/bin/curl",
            "command_line": cmd, "args": _args(cmd),
            "parent": {"name": "bash", "pid": 1, "command_line": parent_cmd,
                       "args": _args(parent_cmd)},
        },
        "user": {"name": "root"}, "host": {"name": "node-0"},
        "destination": {"ip": "169.254.169.254", "port": 80},
    }
    return Event(T0, "169.254.169.254", "curl", dst_port=80, pid=4242, exe="/usr/bin/curl",
                 command_line=cmd, parent_name="bash", user="root", host="node-0",
                 method="GET", path="/latest/meta-data/iam/security-credentials/role",
                 guarded=False, user_agent="curl/8.5.0", doc=doc)


def _args(cmd: str) -> list[str]:
    try:
        return shlex.split(cmd)
    except ValueError:
        return cmd.split()


@pytest.mark.parametrize(("line", "secret"), CORPUS)
def test_secret_never_in_a_redacted_command_line(line, secret):
    out = redact(line)
    assert secret not in out, out
    assert MASK in out
    joined = " ".join(str(a) for a in redact_args(_args(line)))
    assert secret not in joined, joined


@pytest.mark.parametrize(("line", "secret"), CORPUS)
def test_secret_never_in_the_alert_log_or_labels(line, secret, caplog):
    """The secret as the process's and as the parent's command line: the alert line, a log
    line about the event, and every metric label must all be free of it."""
    scorer = Scorer(ScorerSettings(learning_period=86400))
    out = scorer.process(_event(line, f"bash -c '{line}'"))
    assert out.alert, out  # the history-free rule: credentials without the header
    buf = io.BytesIO()
    with AlertWriter(buf) as writer:
        writer.write(out)
    alert_line = buf.getvalue().decode()
    assert secret not in alert_line
    doc = orjson.loads(alert_line)
    assert MASK in doc["process"]["command_line"] and MASK in doc["process"]["parent"][
        "command_line"]
    # logs: the agent logs alerts through build_alert's text, never the raw event
    with caplog.at_level(logging.INFO):
        logging.getLogger("imdswatch.test").info("alert %s", build_alert(out))
    assert secret not in caplog.text
    registry = CollectorRegistry()
    metrics = MetricsExporter(registry=registry)
    metrics.observe(out)
    assert secret not in generate_latest(registry).decode()


def test_harmless_assignments_and_words_stay():
    for line in ("env LANG=C.UTF-8 curl http://169.254.169.254/latest/meta-data/",
                 "bash -c 'cd /srv && make -j4 all'",
                 "export PATH=/usr/local/bin:/usr/bin",
                 "curl -H 'X-aws-ec2-metadata-token-ttl-seconds: 21600' -X PUT "
                 "http://169.254.169.254/latest/api/token"):
        assert redact(line) == line, redact(line)
