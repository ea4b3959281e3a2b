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
        ("fleet", ["datasource", "cluster", "job_namespace"]),
        ("job", ["datasource", "cluster", "job_namespace", "job_name", "job_id"]),
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


def panels(board: dict) -> list[dict]:
    return [p for p in board["panels"] if p["type"] != "row"]


@pytest.mark.parametrize("name", NAMES)
def test_units_people_read(name):
    for panel in panels(load(name)):
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        exprs = " ".join(t["expr"] for t in panel["targets"])
        if "emissions_grams" in exprs:
            assert unit in ("suffix: gCO2eq", "suffix: gCO2eq/h"), panel["title"]
            assert (unit == "suffix: gCO2eq/h") == ("rate(" in exprs), panel["title"]
        elif "carbon_intensity" in exprs:
            assert unit == "suffix: gCO2eq/kWh", panel["title"]
        elif "energy_joules_total" in exprs and "rate(" not in exprs and unit != "percentunit":
            # Energy totals in kWh, converted from the joule counters.
            assert unit == "kwatth" and "/ 3.6e6" in exprs, panel["title"]
        elif "energy_joules_total" in exprs and "rate(" in exprs and "/" not in exprs:
            assert unit == "watt", panel["title"]


@pytest.mark.parametrize("name", NAMES)
def test_power_comes_from_energy_counters(name):
    """A 1 s power gauge scraped every 15 s aliases bursty load: every power
    (but the device list) is rate() of an energy counter."""
    for panel in panels(load(name)):
        for target in panel["targets"]:
            if panel["title"] != "Devices and sources":
                assert "_power_watts" not in target["expr"], panel["title"]


@pytest.mark.parametrize("name", NAMES)
def test_legends_name_labels_the_query_keeps(name):
    for panel in panels(load(name)):
        for target in panel["targets"]:
            legend = target.get("legendFormat", "")
            groupings = re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", target["expr"])
            if not groupings or "without" in target["expr"]:
                continue  # no aggregation: the series keep all their labels
            kept = {label.strip() for label in groupings[-1].split(",")} | {"__name__"}
            if target["expr"].lstrip().startswith(("topk", "(topk")):
                kept = {label.strip() for label in groupings[0].split(",")}
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
                assert label in kept, f"{panel['title']}: legend {{{{{label}}}}} but the query keeps {sorted(kept)}"


def test_first_screen_answers_the_ops_questions():
    board = load("fleet")
    first = [p["title"] for p in board["panels"] if p["gridPos"]["y"] < 20 and p["type"] != "row"]
    for title in (
        "Power now",
        "Energy in range",
        "Emissions in range",
        "Idle share",
        "Modelled share",
        "Top jobs by energy",
        "Top jobs by emissions",
        "Allocated-but-idle GPU energy by job",
        "Top namespaces by energy",
        "Top namespaces by emissions",
        "Allocated-but-idle GPU energy by namespace",
    ):
        assert title in first, title
    (by_job,) = [p for p in board["panels"] if p["title"] == "Job power by job"]
    assert by_job["targets"][0]["expr"].startswith("topk(")


def test_links_fleet_to_job_to_node():
    for name in NAMES:
        (links,) = [load(name)["links"]]
        assert links[0]["type"] == "dashboards" and links[0]["tags"] == ["jouleward"] and links[0]["keepTime"]
    urls = {
        name: [
            link["url"]
            for p in panels(load(name))
            for link in p.get("fieldConfig", {}).get("defaults", {}).get("links", [])
        ]
        for name in NAMES
    }
    assert any("/d/jouleward-job/" in u and "var-job_id=${__field.labels.job_id}" in u for u in urls["fleet"])
    assert any("/d/jouleward-node/" in u and "var-instance=${__field.labels.instance}" in u for u in urls["fleet"])
    assert any("/d/jouleward-node/" in u for u in urls["job"])


def test_finished_jobs_keep_their_totals_on_screen():
    for panel in panels(load("job")):
        if panel["type"] == "stat" and panel["title"] != "Power now":
            assert "last_over_time(" in panel["targets"][0]["expr"] and "[$__range]" in panel["targets"][0]["expr"]


def test_node_dashboard_shows_the_agents_health():
    exprs = " ".join(t["expr"] for p in panels(load("node")) for t in p["targets"])
    for metric in (
        "jouleward_ticks_total",
        "jouleward_sensor_up",
        "jouleward_kubelet_up",
        "jouleward_kubelet_metadata_stale",
        "jouleward_ledger_flush_timestamp_seconds",
        "jouleward_ledger_errors_total",
        "jouleward_grid_carbon_intensity_grams_per_kwh",
        "jouleward_carbon_intensity_errors_total",
    ):
        assert metric in exprs, metric
