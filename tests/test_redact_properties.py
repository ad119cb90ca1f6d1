# Metadata addresses here are event data only; nothing connects to them, so no netns is needed.
# Metadata addresses in this file are data (event fields): nothing here connects to them.
"""Property tests: a secret planted in any form an alert could carry never leaves in it.

Each example plants one random secret in one of the forms secrets take (split argv, header
dicts, IMDS credential JSON, basic auth, URL userinfo, -pPASSWORD, Vault/GitHub tokens, a
parent's VAR=secret) and in fields the contract does not name at all; the whole serialized
alert must not contain it.
"""

import orjson
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from exporters.alerts import build_alert
from exporters.redact import redact, redact_args
from intake.parser import event_from_ecs
from scoring.endpoints import BUILTIN_ENDPOINTS
from scoring.scorer import Outcome

# Token-like values: what credentials look like (base64/base64url/hex plus . and -).
SECRET = st.from_regex(r"[A-Za-z0-9]{6}[A-Za-z0-9._+=/-]{2,40}", fullmatch=True)
ALNUM = st.from_regex(r"[A-Za-z0-9]{36,40}", fullmatch=True)

COMMAND_FORMS = [
    'curl -H "X-aws-ec2-metadata-token: {s}" http://169.254.169.254/latest/meta-data/',
    "curl -H 'Authorization: Bearer {s}' https://api",
    "python3 -c \"requests.get(u, headers={{'X-aws-ec2-metadata-token': '{s}'}})\"",
    "python3 -c \"requests.get(u, headers={{'Authorization': 'Bearer {s}'}})\"",
    "echo '{{\"AccessKeyId\": \"{s}\", \"SecretAccessKey\": \"{s}\"}}'",
    "echo '{{\"Code\": \"Success\", \"Token\": \"{s}\", \"Expiration\": \"x\"}}'",
    "jq -n '{{\"SessionToken\": \"{s}\"}}'",
    "vault login --token {s}",
    "vault login -token='{s}'",
    "kubectl --token={s} get pods",
    "mysql --password '{s}' -h db",
    "mysql -p{s} -h db",
    "curl -s http://x/api?access_token={s}&y=1",
    "aws configure set aws_secret_access_key {s}",
    "env AWS_SECRET_ACCESS_KEY={s} aws s3 ls",
    "bash -c 'DB_PASSWORD={s} ./run.sh'",
    "sh -c \"export VAULT_TOKEN={s}; curl http://169.254.169.254/\"",
    "GITHUB_TOKEN={s} gh api /user",
    "API_KEY={s} python3 app.py",
]
USERINFO_FORMS = [
    "curl -u admin:{s} http://169.254.169.254/",
    "curl --user=admin:{s} http://x",
    "wget http://admin:{s}@repo.example/pkg",
    "git clone https://oauth2:{s}@gitlab.example/x.git",
]
SHAPED = ["hvs.{s}", "ghp_{s}", "github_pat_{s}", "glpat-{s}"]


def alert_for(doc: dict) -> str:
    base = {"@timestamp": 1_700_000_000, "destination": {"ip": "169.254.169.254", "port": 80}}
    out = Outcome(event_from_ecs({**base, **doc}), BUILTIN_ENDPOINTS[0])
    out.score, out.detector, out.rule_name = 90.0, "rare_process", "Unusual"
    out.reason, out.entity, out.alert = "rare", "curl", True
    return orjson.dumps(build_alert(out)).decode()


def planted(command_line: str, args: list[str]) -> dict:
    return {"process": {"name": "curl", "command_line": command_line, "args": args,
                        "parent": {"name": "bash", "command_line": command_line,
                                   "args": args}}}


@settings(max_examples=300, deadline=None)
@given(secret=SECRET, form=st.sampled_from(COMMAND_FORMS))
def test_command_line_secret_never_in_alert(secret: str, form: str) -> None:
    assume(secret not in form.replace("{s}", ""))
    line = form.format(s=secret)
    assert secret not in alert_for(planted(line, line.split()))


@settings(max_examples=150, deadline=None)
@given(secret=SECRET.filter(lambda s: "/" not in s), form=st.sampled_from(USERINFO_FORMS))
def test_userinfo_secret_never_in_alert(secret: str, form: str) -> None:
    assume(secret not in form.replace("{s}", ""))
    line = form.format(s=secret)
    assert secret not in alert_for(planted(line, line.split()))


@settings(max_examples=150, deadline=None)
@given(secret=ALNUM, form=st.sampled_from(SHAPED), prefix=st.sampled_from(["", "echo ", "x="]))
def test_shaped_tokens_never_in_alert(secret: str, form: str, prefix: str) -> None:
    token = form.format(s=secret)
    line = f"run {prefix}{token} now"
    assert secret not in alert_for(planted(line, line.split()))


@settings(max_examples=150, deadline=None)
@given(secret=SECRET, option=st.sampled_from(["--token", "-token", "--password", "--secret",
                                               "--api-key", "--client-secret",
                                               "--vault-token", "--access-key"]))
def test_option_and_value_in_separate_argv_elements(secret: str, option: str) -> None:
    args = ["tool", option, secret, "http://169.254.169.254/"]
    assume(secret not in " ".join(args[:2] + args[3:]))
    assert secret not in str(redact_args(args))
    assert secret not in alert_for({"process": {"name": "tool", "args": args}})


@settings(max_examples=150, deadline=None)
@given(secret=SECRET)
def test_fields_the_contract_does_not_name_never_leave(secret: str) -> None:
    doc = {
        "process": {"name": "curl", "env_vars": [f"X={secret}"], "title": secret,
                    "entry_leader": {"command_line": secret, "name": secret},
                    "session_leader": {"args": [secret]}, "environment": {"X": secret},
                    "parent": {"name": "bash", "title": secret, "env_vars": [secret]}},
        "container": {"id": "c1", "labels": {"x": secret}, "image": {"name": "i", "tag": secret}},
        "orchestrator": {"namespace": "ns", "resource": {"name": "pod",
                                                         "annotations": {"a": secret}}},
        "http": {"request": {"method": "GET", "headers": {"X-aws-ec2-metadata-token": secret},
                             "body": {"content": secret}}},
        "user": {"name": "u", "email": secret},
        "host": {"name": "n", "ip": [secret]},
        "cloud": {"instance": {"id": secret}},
    }
    text = alert_for(doc)
    assert secret not in text
    assert '"process":{"name":"curl"' in text.replace(" ", "")


@settings(max_examples=100, deadline=None)
@given(secret=SECRET)
def test_request_fields_are_redacted(secret: str) -> None:
    doc = {"process": {"name": "curl"},
           "url": {"path": "/latest/meta-data/", "query": f"token={secret}"},
           "user_agent": {"original": f"curl/8 Authorization: Bearer {secret}"}}
    assert secret not in alert_for(doc)


@settings(max_examples=100, deadline=None)
@given(secret=SECRET.filter(lambda s: ":" not in s), option=st.sampled_from(["-u", "--user"]))
def test_user_password_in_the_next_argv_element(secret: str, option: str) -> None:
    args = ["curl", option, f"admin:{secret}", "http://169.254.169.254/"]
    assume(secret not in "curl admin http://169.254.169.254/")
    out = redact_args(args)
    assert secret not in str(out) and out[2] == "admin:[REDACTED]"


def test_harmless_words_stay_readable() -> None:
    assert redact_args(["runuser", "-u", "nobody", "--", "mkdir", "-p", "/x"]) == [
        "runuser", "-u", "nobody", "--", "mkdir", "-p", "/x"]
    line = ('curl -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 21600" '
            "http://169.254.169.254/latest/api/token")
    assert redact(line) == line
    assert redact_args(["curl", "-s", "-o", "/tmp/x", "http://x"]) == [
        "curl", "-s", "-o", "/tmp/x", "http://x"]
