"""The committed dashboards are exactly what grafana/generate.py produces,
Grafana 11's schema (through the SDK) reads them back, and every panel is
wired to the data source and template variables."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "grafana"
COMMITTED = GRAFANA / "dashboards"
NAMES = ["fleet", "job", "node"]

sdk_dashboard = pytest.importorskip("grafana_foundation_sdk.models.dashboard")
from grafana_foundation_sdk.cog.encoder import JSONEncoder  # noqa: E402


def load(name: str) -> dict:
    return json.loads((COMMITTED / f"{name}.json").read_text())


def targets(board: dict) -> list[dict]:
    return [t for panel in board["panels"] for t in panel.get("targets", [])]


def test_committed_json_equals_a_fresh_generation(tmp_path):
    done = subprocess.run(
        [sys.executable, str(GRAFANA / "generate.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in COMMITTED.glob("*.json"))
    for fresh in tmp_path.iterdir():
        assert fresh.read_text() == (COMMITTED / fresh.name).read_text(), (
            f"{fresh.name} drifted: run python3 grafana/generate.py and commit the result"
        )


@pytest.mark.parametrize("name", NAMES)
def test_sdk_reads_the_json_back(name):
    board = load(name)
    again = json.loads(json.dumps(sdk_dashboard.Dashboard.from_json(board), cls=JSONEncoder))
    assert again == board


@pytest.mark.parametrize(
    "name, variables",
    [
        ("fleet", ["datasource", "cluster", "namespace"]),
        ("job", ["datasource", "cluster", "namespace", "job_name"]),
        ("node", ["datasource", "cluster", "instance"]),
    ],
)
def test_template_variables(name, variables):
    board = load(name)
    found = [v["name"] for v in board["templating"]["list"]]
    assert found == variables
    for variable in board["templating"]["list"][1:]:
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert variable["allValue"] == ".*"
    # Every variable narrows at least one query.
    exprs = " ".join(t["expr"] for t in targets(board))
    for variable in variables[1:]:
        assert f'=~"${variable}"' in exprs


@pytest.mark.parametrize("name", NAMES)
def test_panels_use_the_datasource_variable_and_never_group_by_job(name):
    board = load(name)
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len(panels) >= 8
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            # Jobs are job_name; `job` is the scrape job and only joins targets.
            for grouping in re.findall(r"\bby\s*\(([^)]*)\)", target["expr"]):
                assert "job" not in [label.strip() for label in grouping.split(",")], target["expr"]


def test_dashboard_uids_are_stable_and_distinct():
    uids = [load(name)["uid"] for name in NAMES]
    assert uids == ["jouleward-fleet", "jouleward-job", "jouleward-node"]


def test_provisioning_points_grafana_at_the_files():
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "jouleward.yaml").read_text())
    (entry,) = provider["providers"]
    assert entry["type"] == "file" and entry["options"]["path"].startswith("/")
    source = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert source["datasources"][0]["type"] == "prometheus"
