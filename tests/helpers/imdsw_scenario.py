# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them. Real connections happen only inside a test's own network namespace
# (netns, tests/netns_fixtures.py).
"""A small labelled fleet for exporter tests: three nodes whose agent calls the metadata
service every 10 s for an hour, then a web shell's curl on one node."""

from __future__ import annotations

T0 = 1714564800.0
NODES = ("node-1", "node-2", "node-3")


def baseline_events(seconds: int = 3600, step: int = 10) -> list[dict]:
    docs = []
    for i in range(0, seconds, step):
        for node in NODES:
            docs.append({
                "@timestamp": T0 + i,
                "destination": {"ip": "169.254.169.254", "port": 80},
                "process": {"name": "amazon-ssm-agen", "executable": "/usr/bin/amazon-ssm-agent",
                            "parent": {"name": "systemd"}},
                "user": {"name": "root"}, "host": {"name": node},
            })
    # Off-target traffic the scorer skips.
    docs.append({"@timestamp": T0 + 5, "destination": {"ip": "10.0.0.1", "port": 443},
                 "process": {"name": "kubelet"}, "host": {"name": "node-1"}})
    return docs


def attack_event(offset: float = 3700.0) -> dict:
    return {
        "@timestamp": T0 + offset,
        "event": {"id": "attack-1"},
        "destination": {"ip": "169.254.169.254", "port": 80},
        "process": {
            "name": "curl", "pid": 31337, "executable": "/usr/bin/curl",
            "command_line": 'curl -s -H "X-aws-ec2-metadata-token: AQAEsecretvalue" '
                            "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
            "parent": {"name": "sh", "pid": 31300},
        },
        "user": {"name": "www-data", "id": "33"},
        "host": {"name": "node-2"},
        "orchestrator": {"namespace": "web", "resource": {"name": "shop-7d9f"}},
    }
