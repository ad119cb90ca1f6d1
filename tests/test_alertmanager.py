"""The Alertmanager example is valid (`amtool check-config`), routes each imdswatch alert
where the runbook says, and inhibits per-process pages while the agent is down or learning
(`amtool config routes test`)."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
RULES = ROOT / "deploy" / "prometheus" / "imdswatch-rules.yaml"
AMTOOL = shutil.which("amtool")
needs_amtool = pytest.mark.skipif(
    AMTOOL is None, reason="amtool not installed (scripts/setup.sh installs Debian's "
    "prometheus-alertmanager, which provides it)")


@needs_amtool
def test_amtool_check_config() -> None:
    r = subprocess.run([AMTOOL, "check-config", str(CONFIG)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@needs_amtool
@pytest.mark.parametrize(("labels", "receiver"), [
    (["alertname=UnusualLinuxProcessCallingMetadataService", "host=n1", "process=curl"],
     "security-pager"),
    (["alertname=UnusualLinuxUserCallingMetadataService"], "security-pager"),
    (["alertname=ImdswatchProcessNewToFleet"], "security-chat"),
    (["alertname=ImdswatchAgentDown"], "platform-chat"),
    (["alertname=ImdswatchAlertsHeldBack"], "platform-chat"),
    (["alertname=ImdswatchLearning"], "blackhole"),
])
def test_routes(labels: list[str], receiver: str) -> None:
    r = subprocess.run([AMTOOL, "config", "routes", "test", f"--config.file={CONFIG}",
                        *labels], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == receiver


def test_inhibitions_name_real_alerts() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    config = yaml.safe_load(CONFIG.read_text())
    first = config["inhibit_rules"][0]
    sources = first["source_matchers"][0].split('"')[1].split("|")
    assert set(sources) <= alerts
    assert {"ImdswatchAgentDown", "ImdswatchNotReady", "ImdswatchLearning"} <= set(sources)
    assert first["equal"] == ["instance"]
