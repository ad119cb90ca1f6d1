"""Write the PrometheusRule for the Prometheus Operator from the plain rules file.

    python deploy/prometheus/render_prometheusrule.py          # rewrite the manifest
    python deploy/prometheus/render_prometheusrule.py --check  # exit 1 if it is stale

The plain file is the one source of truth (promtool tests read it); the Operator's
PrometheusRule only wraps its `groups` in a Kubernetes object.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "imdswatch-rules.yaml"
MANIFEST = HERE.parent / "kubernetes" / "components" / "prometheus-operator" / "prometheusrule.yaml"

HEADER = (
    "# Generated from deploy/prometheus/imdswatch-rules.yaml by\n"
    "# deploy/prometheus/render_prometheusrule.py; edit that file, not this one.\n"
)


def render(rules_text: str) -> str:
    groups = yaml.safe_load(rules_text)["groups"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "imdswatch",
            "labels": {"app.kubernetes.io/name": "imdswatch",
                       "app.kubernetes.io/component": "alerting"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=4096, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that the manifest is current")
    args = ap.parse_args(argv)
    wanted = render(RULES.read_text())
    if args.check:
        current = MANIFEST.read_text() if MANIFEST.exists() else ""
        if current != wanted:
            print(f"{MANIFEST} is stale; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    MANIFEST.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
