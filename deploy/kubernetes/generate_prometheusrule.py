"""Write components/prometheus-operator/prometheusrule.yaml from deploy/prometheus/jouleward-rules.yml.

    python3 deploy/kubernetes/generate_prometheusrule.py

The rules file is the one that promtool checks and unit-tests; the
PrometheusRule carries its groups unchanged, and a test fails when they drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE.parent / "prometheus" / "jouleward-rules.yml"
TARGET = HERE / "components" / "prometheus-operator" / "prometheusrule.yaml"
HEADER = "# Generated from deploy/prometheus/jouleward-rules.yml by generate_prometheusrule.py: do not edit.\n"


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(rules_text: str) -> str:
    groups = yaml.safe_load(rules_text)["groups"]
    document = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "jouleward",
            "labels": {"app.kubernetes.io/name": "jouleward", "role": "alert-rules"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def main() -> int:
    TARGET.write_text(render(RULES.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
