"""A warm model for the lab: a fleet on which only the SSM agent has called the metadata
service, so that anything else calling it is rare from the first event."""

from __future__ import annotations

import time
from pathlib import Path

from intake.parser import event_from_ecs
from scoring.scorer import Scorer
from scoring.settings import ScorerSettings
from scoring.state import save_state


def warm_state(path: Path, days: float = 3.0, hosts: int = 20, events: int = 3000) -> None:
    """A model that has seen only amazon-ssm-agent call IMDS on a fleet for `days`: curl, wget
    and friends are then rare, as in the contract's replay-warms-the-agent flow."""
    scorer = Scorer(ScorerSettings(learning_period=0))
    t0 = time.time() - days * 86400
    step = days * 86400 / events
    for i in range(events):
        scorer.process(event_from_ecs({
            "@timestamp": t0 + i * step,
            "destination": {"ip": "169.254.169.254", "port": 80},
            "process": {"name": "amazon-ssm-agent", "executable": "/usr/bin/amazon-ssm-agent",
                        "parent": {"name": "systemd", "executable": "/usr/lib/systemd/systemd"}},
            "user": {"name": "root", "id": "0"},
            "host": {"name": f"node-{i % hosts}"},
        }))
    save_state(path, scorer)
