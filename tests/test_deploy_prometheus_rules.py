"""promtool checks the rules and runs their unit tests, which cover every
recording rule, every alert (firing and staying quiet) and every PromQL query
in docs/."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "jouleward-rules.yml"
UNIT_TESTS = PROM / "tests" / "jouleward-rules.test.yml"
DOCS = ROOT / "docs"
RUNBOOKS = DOCS / "runbooks.md"
RUNBOOK_BASE = "https://github.com/jouleward/jouleward/blob/main/docs/runbooks.md#"
PROMQL_BLOCK = re.compile(r"```promql\n(.*?)```", re.S)
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


def all_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_rules_check():
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(all_rules())} rules found" in done.stdout


def test_rule_unit_tests_pass():
    done = promtool("test", "rules", str(UNIT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_is_tested_firing_and_quiet():
    cases = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    checks = [check for case in cases for check in case.get("alert_rule_test", [])]
    for alert in (rule["alert"] for rule in all_rules() if "alert" in rule):
        mine = [check for check in checks if check["alertname"] == alert]
        assert any(check["exp_alerts"] for check in mine), f"{alert} is never shown firing"
        assert any(not check["exp_alerts"] for check in mine), f"{alert} is never shown quiet"


def test_every_recording_rule_is_tested():
    cases = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    tested = {check["expr"] for case in cases for check in case.get("promql_expr_test", [])}
    assert {rule["record"] for rule in all_rules() if "record" in rule} <= tested


def test_no_rule_writes_a_job_label():
    for rule in all_rules():
        assert "job" not in rule.get("labels", {})
        for grouping in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", rule["expr"]):
            assert "job" not in [label.strip() for label in grouping.split(",")], rule["expr"]


def test_every_alert_has_a_runbook_in_docs():
    headings = {line[3:].strip().lower() for line in RUNBOOKS.read_text().splitlines() if line.startswith("## ")}
    for rule in all_rules():
        if "alert" in rule:
            url = rule["annotations"].get("runbook_url", "")
            assert url == RUNBOOK_BASE + rule["alert"].lower(), rule["alert"]
            assert rule["alert"].lower() in headings, f"docs/runbooks.md has no section for {rule['alert']}"


def _exp_label_names(record: str) -> list[set[str]]:
    cases = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    found = []
    for case in cases:
        for check in case.get("promql_expr_test", []):
            if check["expr"] == record:
                for sample in check["exp_samples"]:
                    found.append(set(re.findall(r"(\w+)=", sample["labels"])))
    return found


def test_recording_rule_names_are_level_metric_operations():
    metrics = {name for name in re.findall(r"\b(jouleward_[a-z_]+)", RULES.read_text())}
    for rule in (r for r in all_rules() if "record" in r):
        level, metric, operations = rule["record"].split(":")
        # The level is exactly the labels every result keeps, in some order.
        for labels in _exp_label_names(rule["record"]):
            assert any("_".join(order) == level for order in itertools.permutations(labels)), (
                f"{rule['record']}: level {level!r} but results keep {sorted(labels)}"
            )
        uses_rate = re.search(r"\brate\(", rule["expr"]) is not None
        if uses_rate:
            # A rate drops the counter's _total and says its window.
            assert not metric.endswith("_total") and re.search(r"rate\d+[smhd]$", operations), rule["record"]
        else:
            # A sum (or max over time) of a counter keeps its _total.
            assert metric in metrics and metric.endswith("_total"), rule["record"]


def test_every_promql_query_in_docs_is_unit_tested():
    cases = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    tested = {" ".join(check["expr"].split()) for case in cases for check in case.get("promql_expr_test", [])}
    queries = [
        (path.name, " ".join(block.split()))
        for path in sorted(DOCS.glob("*.md"))
        for block in PROMQL_BLOCK.findall(path.read_text())
    ]
    assert len(queries) >= 5, queries
    untested = [f"{name}: {query}" for name, query in queries if query not in tested]
    assert untested == []


def test_the_grid_alert_ignores_static_intensity():
    (rule,) = [r for r in all_rules() if r.get("alert") == "JoulewardGridIntensityHigh"]
    assert 'source=~"http|csv"' in rule["expr"]


@pytest.mark.parametrize(
    "old, new",
    [
        ("> 3.6e8", "> 3.6e9"),  # energy budget ten times higher: the firing case goes quiet
        ("> 400", "> 40"),  # intensity threshold below the clean zone: the quiet case fires
        ("for: 10m", "for: 1m"),  # sensor alert without patience: fires too early
        (
            "max_over_time(jouleward_job_energy_joules_total[1d])",
            "jouleward_job_energy_joules_total",
        ),  # resolves with the series
        (
            "sum by (cluster, job_namespace, job_id, job_name) (max_over_time(jouleward_job_energy_joules_total",
            "sum by (cluster, job_namespace, job_name) (max_over_time(jouleward_job_energy_joules_total",
        ),  # adds up reruns
        ("1000 * sum by", "sum by"),  # grams per unit, not per 1,000 units
        (
            "sum by (cluster, model, unit) (cluster_job_namespace_job_id_job_name_model_unit",
            "max by (cluster, model, unit) (cluster_job_namespace_job_id_job_name_model_unit",
        ),  # one replica's energy for all of a model's work
    ],
)
def test_unit_tests_catch_a_changed_rule(tmp_path, old, new):
    text = RULES.read_text()
    assert old in text
    (tmp_path / "tests").mkdir()
    (tmp_path / "jouleward-rules.yml").write_text(text.replace(old, new, 1))
    shutil.copy(UNIT_TESTS, tmp_path / "tests" / UNIT_TESTS.name)
    done = promtool("test", "rules", str(tmp_path / "tests" / UNIT_TESTS.name))
    assert done.returncode != 0


def test_example_scrape_config_is_valid(tmp_path):
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config["rule_files"] = [str(RULES)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    done = promtool("check", "config", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "jouleward"
