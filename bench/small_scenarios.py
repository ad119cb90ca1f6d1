# Metadata addresses here are event data only; nothing connects to them, so no netns is needed.
# Metadata addresses in this file are data (event fields): nothing here connects anywhere.
"""Two single-host scenarios the fleet scenario cannot show:

* quiet host: one AWS node where two agents call every ten minutes for three days; then a
  guarded spray (40 throwaway callers making well-formed IMDSv2 requests, then `curl`
  fetching the role's credentials with a token two minutes later: the spray may be folded
  into one alert, the credential request must not be); three hours later `curl` again, and
  within the same minute two new tools. Judged after the learning period, like the fleet.
* fresh node: a node's first hour, from boot (cloud-init, the SSM agent, kubelet): ten
  minutes in, a user following a tutorial curls the role's credentials without a token
  from a shell, and a debug pod does the same from python. No history exists: alerts
  during the learning period count for every system ("no blind first day").
"""

from __future__ import annotations

import random
from types import SimpleNamespace

from bench import http_requests as R
from bench.attacks import Actor
from bench.ecs import Host, Pod, Proc, Req, Trace
from bench.fleet import DAY, HOUR, SYSTEMD, emit_requests
from bench.scenario import START, Scenario
from bench.timing import burst, pair, periodic

IMDS = ("169.254.169.254", 80)
BASH = ("bash", "/usr/bin/bash")


def _host(name: str, join: float) -> Host:
    return Host(name, "i-0" + name.encode().hex()[:16], "aws", "us-east-1", "eks-prod-use1",
                join, True)


def _proc(rng: random.Random, name: str, exe: str, user: str, parent: tuple[str, str],
          cmd: str) -> Proc:
    return Proc(name, exe, user, "0" if user == "root" else "1000", parent[0], parent[1],
                cmd, rng.randrange(1000, 60000), rng.randrange(1000, 60000))


def _attack(trace: Trace, actors: list[Actor], aid: str, kind: str, desc: str, host: Host,
            proc: Proc, times: list[float], reqs: tuple[Req, ...], pod: Pod | None = None
            ) -> None:
    actors.append(Actor(aid, kind, desc, host.name, min(times), max(times), len(times)))
    emit_requests(trace, host, proc, IMDS, times, "attack", aid, pod, reqs)


def quiet_host(seed: int = 7, days: float = 3.0) -> Scenario:
    rng = random.Random(seed)
    trace = Trace()
    start, end = START, START + days * DAY + HOUR
    h = _host("ip-10-0-7-7.ec2.internal", start - 30 * DAY)
    ssm = _proc(rng, "amazon-ssm-agent", "/usr/bin/amazon-ssm-agent", "root", SYSTEMD,
                "/usr/bin/amazon-ssm-agent")
    cw = _proc(rng, "amazon-cloudwatch-agent",
               "/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent", "root",
               SYSTEMD, "/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent")
    emit_requests(trace, h, ssm, IMDS, pair(periodic(rng, start, end, 600)), "benign",
                  "benign/amazon-ssm-agent", None, R.SSM)
    emit_requests(trace, h, cw, IMDS, pair(periodic(rng, start, end, 600)), "benign",
                  "benign/cloudwatch-agent", None,
                  R.v2(R.GO_SDK_V1, "/latest/meta-data/instance-id",
                       "/latest/meta-data/placement/region"))
    t = start + days * DAY
    actors: list[Actor] = []
    _guarded_spray(rng, trace, actors, h, t - 3 * HOUR)
    tools = (("curl", "/usr/bin/curl", "curl/7.88.1"),
             ("wget", "/usr/bin/wget", "Wget/1.21.3"),
             ("python3", "/usr/bin/python3.9", "Python-urllib/3.9"))
    for k, (name, exe, ua) in enumerate(tools):
        ordinal = ("first", "second", "third")[k]
        _attack(trace, actors, f"quiet-host-{name}", "quiet_host",
                f"the {ordinal} new tool on a quiet host ({name} as root from bash, IMDSv2 "
                "for the instance id), within a minute of the others",
                h, _proc(rng, name, exe, "root", BASH, f"{name} http://169.254.169.254/"),
                pair([t + 20.0 * k]), R.v2(ua, "/latest/meta-data/instance-id"))
    return Scenario(seed, 1.0, start, end, trace, SimpleNamespace(hosts=[h]), actors)


def _guarded_spray(rng: random.Random, trace: Trace, actors: list[Actor], h: Host,
                   t: float) -> None:
    """40 throwaway callers, 2 s apart, each a well-formed IMDSv2 call (session token, then
    the instance id with it), then curl with a token for the role's credentials 2 min on."""
    times = []
    for i in range(40):
        name = f"{rng.randrange(16 ** 6):06x}"
        times.append(t + 2.0 * i)
        emit_requests(trace, h, _proc(rng, name, f"/tmp/.cache/{name}", "root", BASH,
                                      f"/tmp/.cache/{name}"),
                      IMDS, pair([t + 2.0 * i]), "attack", "quiet-host-guarded-spray", None,
                      R.v2("curl/7.88.1", "/latest/meta-data/instance-id"))
    actors.append(Actor("quiet-host-guarded-spray", "quiet_host",
                        "40 throwaway callers making well-formed IMDSv2 requests, 2 s apart",
                        h.name, times[0], times[-1], 2 * len(times)))
    creds = R.AWS_ROLE + R.NODE_ROLE
    _attack(trace, actors, "quiet-host-creds-after-spray", "quiet_host",
            "curl fetches the role's credentials with an IMDSv2 token, 2 minutes after a "
            "guarded spray of 40 throwaway callers (must not be folded into the spray's alert)",
            h, _proc(rng, "curl", "/usr/bin/curl", "root", BASH,
                     f"curl -H X-aws-ec2-metadata-token:$T http://169.254.169.254{creds}"),
            pair([times[-1] + 120.0]), R.v2("curl/7.88.1", creds))


def fresh_node(seed: int = 7) -> Scenario:
    rng = random.Random(seed)
    trace = Trace()
    start = START
    end = start + HOUR
    h = _host("ip-10-0-9-9.ec2.internal", start)
    ci = _proc(rng, "cloud-init", "/usr/bin/python3.9", "root", SYSTEMD,
               "/usr/bin/python3 /usr/bin/cloud-init init")
    emit_requests(trace, h, ci, IMDS, sorted(start + rng.uniform(2, 40) for _ in range(24)),
                  "benign", "benign/cloud-init", None, R.CLOUD_INIT_REQS["aws"])
    for name, exe, period, reqs in (
            ("amazon-ssm-agent", "/usr/bin/amazon-ssm-agent", 900, R.SSM),
            ("kubelet", "/usr/bin/kubelet", 1800, R.KUBELET_AWS)):
        p = _proc(rng, name, exe, "root", SYSTEMD, exe)
        emit_requests(trace, h, p, IMDS, pair(periodic(rng, start + 90, end, period)),
                      "benign", f"benign/{name}", None, reqs)
    yum = _proc(rng, "yum", "/usr/bin/python2.7", "root", SYSTEMD, "/usr/bin/yum makecache")
    emit_requests(trace, h, yum, IMDS, pair([start + 300]), "benign", "benign/yum", None,
                  R.YUM)
    actors: list[Actor] = []
    t = start + 10 * 60
    creds = R.AWS_ROLE
    _attack(trace, actors, "fresh-node-curl-creds", "fresh_node",
            "a user on a node ten minutes old curls the role's credentials without a token",
            h, _proc(rng, "curl", "/usr/bin/curl", "ec2-user", BASH,
                     f"curl http://169.254.169.254{creds}"),
            burst(rng, t, 2, 5.0), (Req("GET", creds, ua="curl/8.3.0", guarded=False),
                                    Req("GET", creds + R.NODE_ROLE, ua="curl/8.3.0",
                                        guarded=False)))
    pod = Pod("default", "debug", "docker.io/library/python:3.12-slim", "ab" * 32)
    _attack(trace, actors, "fresh-node-pod-python-creds", "fresh_node",
            "a debug pod's python asks the role's credentials without a token, 20 minutes in",
            h, _proc(rng, "python3", "/usr/local/bin/python3.12", "root", ("sh", "/bin/sh"),
                     "python3 -c import requests"),
            [t + 600.0], (Req("GET", creds + R.NODE_ROLE, ua="python-requests/2.31.0",
                              guarded=False),), pod)
    return Scenario(seed, 1.0, start, end, trace, SimpleNamespace(hosts=[h]), actors)
