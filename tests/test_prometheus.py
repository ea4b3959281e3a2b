"""promtool and a real Prometheus server against a real agent."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest

from tests.support import AgentProcess, free_port, two_socket_server, wait_until

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
IN_CI = bool(__import__("os").environ.get("CI"))
needs_prometheus = pytest.mark.skipif(
    not (PROMETHEUS and PROMTOOL) and not IN_CI,
    reason="Debian package prometheus not installed (scripts/setup-test-env.sh)",
)


@pytest.fixture
def agent_with_jobs(tmp_path, processes, agents):
    tree = two_socket_server(tmp_path / "sys")
    agent = AgentProcess(tmp_path / "state", sysfs=tmp_path / "sys", interval_s=0.2)
    agents.append(agent)
    sleeper = subprocess.Popen(["sleep", "120"])
    processes.append(sleeper)
    status, job = agent.control(
        "POST",
        "/v1/jobs",
        {
            "name": 'quote " back \\ slash ünï',
            "pids": [sleeper.pid],
            "labels": {"team": "vision", "run_id": "42", "pod_name": 'a"b'},
        },
    )
    assert status == 201, job
    for _ in range(3):
        tree.zones["intel-rapl:0"].add_j(20)
        tree.zones["intel-rapl:0:2"].add_j(3)
        agent.wait_ticks(1)
    return agent, job


@needs_prometheus
def test_promtool_check_metrics_is_clean_on_real_output(agent_with_jobs):
    agent, _ = agent_with_jobs
    text = agent.metrics_text()
    assert "jouleward_job_energy_joules_total" in text
    assert ' job="' not in text and "{job=" not in text and ",job=" not in text
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "" and result.stderr.strip() == "", (
        result.stdout + result.stderr
    )


def _query(port: int, expr: str):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


@needs_prometheus
def test_real_prometheus_scrapes_the_agent(tmp_path, agent_with_jobs):
    agent, job = agent_with_jobs
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: jouleward
    static_configs:
      - targets: ["127.0.0.1:{agent.port}"]
""")
    log = open(tmp_path / "prometheus.log", "wb")
    server = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: _up(port), timeout_s=60, interval_s=0.5, what="Prometheus to scrape the agent")
        result = wait_until(
            lambda: _query(port, f'jouleward_job_energy_joules_total{{job_id="{job["id"]}"}}'),
            timeout_s=30,
            interval_s=0.5,
            what="the job's series in Prometheus",
        )
        labels = result[0]["metric"]
        assert labels["job"] == "jouleward"  # Prometheus' own label, untouched by ours
        assert labels["job_name"] == 'quote " back \\ slash ünï'
        # Conservation as Prometheus sees it, per domain, at one instant.
        wait_until(
            lambda: len(_query(port, "jouleward_idle_energy_joules_total")) >= 2,
            timeout_s=30,
            interval_s=0.5,
            what="idle series",
        )
        expr = (
            'sum by (domain) (jouleward_node_energy_joules_total{domain=~"cpu|dram"}) - on (domain) ('
            'sum by (domain) (jouleward_idle_energy_joules_total) + '
            'sum by (domain) (jouleward_unattributed_energy_joules_total) + '
            'sum by (domain) (jouleward_job_energy_joules_total or on (domain) '
            '(0 * sum by (domain) (jouleward_idle_energy_joules_total))))'
        )
        for sample in _query(port, expr):
            assert abs(float(sample["value"][1])) < 1e-6, sample
        info = _query(port, f'jouleward_job_info{{job_id="{job["id"]}"}}')
        assert info[0]["metric"]["label_pod_name"] == 'a"b'
        rate = wait_until(
            lambda: _query(port, 'sum(rate(jouleward_node_energy_joules_total{domain="cpu"}[5s]))'),
            timeout_s=30,
            interval_s=0.5,
            what="a rate over the node counter",
        )
        assert float(rate[0]["value"][1]) >= 0
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def _up(port: int) -> bool:
    try:
        result = _query(port, "up")
    except OSError:
        return False
    return bool(result) and result[0]["value"][1] == "1"


def _scrape(port: int, accept: str | None) -> tuple[str, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers["Content-Type"], response.read().decode()


def test_metrics_negotiate_openmetrics_with_created_for_job_counters(agent_with_jobs):
    from prometheus_client.openmetrics.parser import (
        text_string_to_metric_families as parse_openmetrics,
    )

    agent, job = agent_with_jobs
    # What Prometheus sends by default: OpenMetrics first.
    prometheus_accept = (
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
        "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    )
    content_type, text = _scrape(agent.port, prometheus_accept)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert text.endswith("# EOF\n")
    families = {family.name: family for family in parse_openmetrics(text)}  # strict: raises on a bad exposition
    started = json.loads(
        urllib.request.urlopen(f"http://127.0.0.1:{agent.port}/v1/jobs/{job['id']}", timeout=10).read()
    )["first_seen"]
    for name in ("jouleward_job_energy_joules", "jouleward_job_cpu_seconds", "jouleward_job_emissions_grams"):
        created = [s for s in families[name].samples if s.name == f"{name}_created" and s.labels["job_id"] == job["id"]]
        assert created and all(s.value == pytest.approx(started, abs=1e-3) for s in created), name
    # Node counters carry no _created: only per-job counters start with their job.
    assert not [s for s in families["jouleward_node_energy_joules"].samples if s.name.endswith("_created")]
    # Anything else, and no Accept header at all, gets the classic text format, without _created.
    for accept in (None, "text/plain;version=0.0.4", "*/*"):
        content_type, plain = _scrape(agent.port, accept)
        assert content_type == "text/plain; version=0.0.4; charset=utf-8", accept
        assert "_created" not in plain and "# EOF" not in plain
        assert "jouleward_job_energy_joules_total{" in plain
