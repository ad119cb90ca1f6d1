"""The fleet's policy (contract section 7): `serve --policy FILE` publishes it at
`GET /v1/policy` with an ETag and keeps the last good one when the file goes bad; agents
with `--policy fleet` take it whole, keep a last good copy for a restart while serve is
away, and refuse a corrupt one with an alert; a live agent applies it (audit), and keeps its last
good copy with a policy_rejected alert line when the fleet's does not read."""

from __future__ import annotations

import gzip
import os
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.error import HTTPError

import pytest
from fleet_fixtures import ServeProcess
from netns_fixtures import AgentProcess, MetadataNamespace, free_port, require_bcc, wait_for

from fleet.policy_doc import PolicyDocument
from fleet.policy_fetch import FleetPolicy
from policy.toml_file import PolicyError

POLICY = '[policy]\ndefault = "deny"\n\n[[rule]]\nname = "ssm"\nprocess = "amazon-ssm-agent"\n'
IMDS = "169.254.169.254"


def get(url: str, etag: str | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers={"If-None-Match": etag} if etag else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_serve_publishes_the_policy_with_an_etag_and_keeps_the_last_good(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    serve = ServeProcess(tmp_path, "--policy", str(policy)).start()
    try:
        status, headers, body = get(serve.url + "/v1/policy")
        assert status == 200 and body.decode() == POLICY
        assert headers["Content-Type"] == "application/toml"
        etag = headers["ETag"]
        assert get(serve.url + "/v1/policy", etag)[0] == 304
        policy.write_text(POLICY + 'default = "maybe"\n')  # not TOML any more
        time.sleep(1.2)
        status, headers, body = get(serve.url + "/v1/policy")
        assert status == 200 and headers["ETag"] == etag and body.decode() == POLICY
        assert wait_for(lambda: serve.metric("imdswatch_fleet_policy_refused_total") == 1, 3)
        policy.write_text(POLICY.replace('"deny"', '"allow"'))
        time.sleep(1.2)
        status, headers, body = get(serve.url + "/v1/policy", etag)
        assert status == 200 and headers["ETag"] != etag and b'"allow"' in body
    finally:
        serve.kill()


def test_serve_without_a_policy_answers_404_and_a_bad_one_stops_it(tmp_path):
    serve = ServeProcess(tmp_path).start()
    try:
        assert get(serve.url + "/v1/policy")[0] == 404
    finally:
        serve.kill()
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nname = "a"\nclasses = ["x"]\n')
    r = subprocess.run(ServeProcess(tmp_path, "--policy", str(bad)).argv, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "classes entry 'x'" in r.stderr and "Traceback" not in r.stderr


def test_the_document_refuses_a_bad_file_at_start(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text("[policy]\ndefault = 3\n")
    with pytest.raises(PolicyError):
        PolicyDocument(str(p))
    p.write_text(POLICY)
    etag, body = PolicyDocument(str(p)).current()
    assert gzip.decompress(body).decode() == POLICY and etag


class Stub:
    """A loopback HTTP server answering GET /v1/policy with fixed bytes and an ETag."""

    def __init__(self, body: bytes) -> None:
        body_ = body

        class H(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.headers.get("If-None-Match") == '"e1"':
                    self.send_response(304)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("ETag", '"e1"')
                self.send_header("Content-Length", str(len(body_)))
                self.end_headers()
                self.wfile.write(body_)

            def log_message(self, *a: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_agents_take_the_fleet_policy_and_keep_the_last_good_one(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    spool = tmp_path / "spool"
    spool.mkdir()
    serve = ServeProcess(tmp_path, "--policy", str(policy)).start()
    try:
        fp = FleetPolicy(serve.url, str(spool), None, None, ())
        pol, source = fp.initial()
        assert source == "the fleet scorer" and pol.default == "deny" and pol.rules[0].name == "ssm"
        assert (spool / "policy.toml").read_text() == POLICY
        fp.close()
    finally:
        serve.kill()
    # A corrupt policy (serve would not publish one; a proxy or a disk might corrupt it):
    # refused once, the previous copy stays.
    with Stub(b'[policy]\ndefault = "deny"\n[[rule]]\nname = 1\n') as url:
        fp = FleetPolicy(url, str(spool), None, None, ())
        assert fp._fetch() is None and fp._fetch() is None
        new, refusals = fp.take()
        assert new is None and len(refusals) == 1 and "'name'" in refusals[0]
        assert (spool / "policy.toml").read_text() == POLICY
        fp.close()
    # serve away: the last good copy
    fp = FleetPolicy(f"http://127.0.0.1:{free_port()}", str(spool), None, None, ())
    pol, source = fp.initial()
    assert source.endswith("policy.toml") and pol.rules[0].name == "ssm"


def test_a_live_agent_audits_with_the_fleet_policy(tmp_path):
    require_bcc()
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    serve = ServeProcess(tmp_path, "--policy", str(policy)).start()
    agent = AgentProcess(tmp_path, "--fleet", serve.url, "--spool", str(tmp_path / "spool"),
                         "--enforce", "audit", "--policy", "fleet")
    try:
        agent.start()
        assert agent.metric("imdswatch_policy_rules") == 1
        with MetadataNamespace(v4=(IMDS,), v6=()) as ns:
            p = ns.popen(["curl", "-s", "-o", "/dev/null", f"http://{IMDS}/latest/meta-data/"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            assert p.wait(20) == 0
        assert wait_for(lambda: [a for a in agent.alert_lines()
                                 if a["process"].get("pid") == p.pid
                                 and a["event"].get("action") == "would_deny"], 5)
        assert os.path.exists(tmp_path / "spool" / "policy.toml")
    finally:
        agent.kill()
        serve.kill()


def test_a_live_agent_keeps_its_policy_and_alerts_when_the_fleets_is_corrupt(tmp_path):
    """The fleet answers a policy that does not read: the agent starts with its last good
    copy (still in force: one rule), writes one policy_rejected alert line naming the error
    and counts it (ImdswatchPolicyStale fires on the count)."""
    require_bcc()
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "policy.toml").write_text(POLICY)
    with Stub(b'[policy]\ndefault = "deny"\n[[rule]]\nname = 1\n') as url:
        agent = AgentProcess(tmp_path, "--fleet", url, "--spool", str(spool),
                             "--enforce", "audit", "--policy", "fleet")
        try:
            agent.start()

            def rejected() -> list[dict]:
                return [a for a in agent.alert_lines()
                        if a["event"].get("action") == "policy_rejected"]

            assert wait_for(rejected, 10), agent.log_tail()
            assert "'name'" in rejected()[0]["imdswatch"]["policy"]["error"]
            assert agent.metric("imdswatch_policy_reload_failures_total") == 1
            assert agent.metric("imdswatch_policy_rules") == 1  # the last good copy
            assert (spool / "policy.toml").read_text() == POLICY
        finally:
            agent.kill()
