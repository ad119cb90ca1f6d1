"""The Prometheus rules pass `promtool check rules`, and every alert fires and stays
silent as the unit tests in deploy/prometheus/tests/ expect (`promtool test rules`)."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "imdswatch-rules.yaml"
OPERATOR_RULE = ROOT / "deploy/kubernetes/components/prometheus-operator/prometheusrule.yaml"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (scripts/setup.sh installs Debian's "
                             "prometheus package, which provides it)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=300)


@needs_promtool
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_operator_rule_embeds_valid_rules(tmp_path) -> None:
    doc = yaml.safe_load(OPERATOR_RULE.read_text())
    extracted = tmp_path / "operator-rules.yaml"
    extracted.write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
    result = promtool("check", "rules", str(extracted))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
@pytest.mark.parametrize("test_file", sorted((PROM / "tests").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_promtool_unit_tests(test_file: Path) -> None:
    result = promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    fired, silent = set(), set()
    for test_file in (PROM / "tests").glob("*.yaml"):
        for test in yaml.safe_load(test_file.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    assert alerts - fired == set(), "alerts no unit test makes fire"
    assert alerts - silent == set(), "alerts no unit test shows staying silent"


def test_seed_rule_identity() -> None:
    rules = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"]
             for r in g["rules"] if "alert" in r}
    for alert, name in [
        ("UnusualLinuxProcessCallingMetadataService",
         "Unusual Linux Process Calling the Metadata Service"),
        ("UnusualLinuxUserCallingMetadataService",
         "Unusual Linux User Calling the Metadata Service"),
    ]:
        labels = rules[alert]["labels"]
        assert labels["rule_name"] == name
        assert labels["severity"] == "low" and labels["risk_score"] == "21"
        assert labels["mitre_tactic"] == "TA0006" and labels["mitre_technique"] == "T1552.005"
        annotations = rules[alert]["annotations"]
        for needle in ("$labels.process", "$labels.user", "$labels.host", "$labels.k8s_pod",
                       "$labels.reason"):
            assert needle in annotations["description"], (alert, needle)
        assert annotations["runbook_url"].startswith("docs/runbook.md#")
    runbook = (ROOT / "docs" / "runbook.md").read_text().lower()
    for rule in rules.values():
        anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
        assert f"## {anchor.replace('-', ' ')}" in runbook.replace("-", " "), anchor
