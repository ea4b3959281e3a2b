"""A real agent process on a fixture RAPL tree, with real jobs."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from tests.support import (
    AgentProcess,
    cpu_seconds,
    metric_sum,
    metric_values,
    start_burner,
    two_socket_server,
    wait_until,
)

ATTRIBUTED = ("cpu", "dram")


class Advancer(threading.Thread):
    """Drives the fixture counters like real hardware: constant watts."""

    def __init__(self, tree, watts: dict[str, float]):
        super().__init__(daemon=True)
        self.tree, self.watts = tree, watts
        self.halt = threading.Event()

    def run(self):
        last = time.monotonic()
        while not self.halt.wait(0.05):
            now = time.monotonic()
            for zone_id, watts in self.watts.items():
                self.tree.zones[zone_id].add_j(watts * (now - last))
            last = now


@pytest.fixture
def rapl(tmp_path):
    tree = two_socket_server(tmp_path / "sys")
    advancer = Advancer(
        tree,
        {
            "intel-rapl:0": 60.0,
            "intel-rapl:1": 45.0,
            "intel-rapl:0:2": 6.0,
            "intel-rapl:1:2": 5.0,
            "intel-rapl:0:0": 40.0,
            "intel-rapl-mmio:0": 60.0,
            "intel-rapl:2": 150.0,
        },
    )
    advancer.start()
    yield tree
    advancer.halt.set()
    advancer.join()


def assert_conserved(samples):
    for domain in ATTRIBUTED:
        node = metric_sum(samples, "jouleward_node_energy_joules_total", domain=domain)
        parts = (
            metric_sum(samples, "jouleward_idle_energy_joules_total", domain=domain)
            + metric_sum(samples, "jouleward_unattributed_energy_joules_total", domain=domain)
            + metric_sum(samples, "jouleward_job_energy_joules_total", domain=domain)
        )
        assert parts == pytest.approx(node, rel=1e-9, abs=1e-9), domain


def test_three_to_one_burners_get_three_to_one_energy(tmp_path, rapl, processes, agents):
    # Ticks of 0.5 s span five 100 ms burner periods, so each tick's CPU ratio is steady.
    agent = AgentProcess(tmp_path / "state", sysfs=tmp_path / "sys", interval_s=0.5)
    agents.append(agent)
    heavy, light = start_burner(0.24), start_burner(0.08)
    processes.extend([heavy, light])
    status, job_a = agent.control("POST", "/v1/jobs", {"name": "heavy", "pids": [heavy.pid], "labels": {"x": "1"}})
    assert status == 201, job_a
    status, job_b = agent.control("POST", "/v1/jobs", {"name": "light", "pids": [light.pid]})
    assert status == 201, job_b
    agent.wait_ticks(2)
    start = agent.metrics()
    cpu_start = cpu_seconds(heavy.pid), cpu_seconds(light.pid)
    previous = start
    for _ in range(20):  # ~10 s of scrapes: conservation and monotonic counters every time
        time.sleep(0.5)
        samples = agent.metrics()
        assert_conserved(samples)
        for name in (
            "jouleward_node_energy_joules_total",
            "jouleward_job_energy_joules_total",
            "jouleward_idle_energy_joules_total",
            "jouleward_unattributed_energy_joules_total",
        ):
            before = {tuple(sorted(l.items())): v for l, v in metric_values(previous, name)}
            for labels, value in metric_values(samples, name):
                assert value >= before.get(tuple(sorted(labels.items())), 0.0)
        previous = samples
    end = previous
    cpu_end = cpu_seconds(heavy.pid), cpu_seconds(light.pid)

    def energy(samples, job_id):
        return metric_sum(samples, "jouleward_job_energy_joules_total", job_id=job_id, domain="cpu")

    energy_a = energy(end, job_a["id"]) - energy(start, job_a["id"])
    energy_b = energy(end, job_b["id"]) - energy(start, job_b["id"])
    real_cpu_ratio = (cpu_end[0] - cpu_start[0]) / (cpu_end[1] - cpu_start[1])
    assert real_cpu_ratio == pytest.approx(3.0, rel=0.2), "the burners themselves drifted"
    # Energy follows the CPU time the burners really got (on a loaded machine that drifts from 3:1).
    assert energy_a / energy_b == pytest.approx(real_cpu_ratio, rel=0.05)
    # node energy is the fixture truth: packages only (core, mmio and psys excluded from cpu)
    node_cpu = metric_sum(end, "jouleward_node_energy_joules_total", domain="cpu") - metric_sum(
        start, "jouleward_node_energy_joules_total", domain="cpu"
    )
    assert 0 < node_cpu
    assert {
        labels["device"] for labels, _ in metric_values(end, "jouleward_node_energy_joules_total", domain="cpu")
    } == {"package-0", "package-1"}
    assert metric_values(end, "jouleward_node_energy_joules_total", domain="platform")[0][0]["source"] == "rapl"
    info = metric_values(end, "jouleward_job_info", job_id=job_a["id"])
    assert info and info[0][0]["label_x"] == "1" and info[0][0]["job_name"] == "heavy"


def test_node_energy_matches_fixture_truth(tmp_path, agents):
    tree = two_socket_server(tmp_path / "sys")
    agent = AgentProcess(tmp_path / "state", sysfs=tmp_path / "sys", interval_s=0.2)
    agents.append(agent)
    agent.wait_ticks(1)
    start = metric_sum(agent.metrics(), "jouleward_node_energy_joules_total", domain="cpu")
    truth = 0.0
    for step in range(10):
        tree.zones["intel-rapl:0"].add_j(13.5)
        tree.zones["intel-rapl-mmio:0"].add_j(13.5)
        tree.zones["intel-rapl:1"].add_j(2.25)
        truth += 15.75
        agent.wait_ticks(1)
    agent.wait_ticks(1)
    end = metric_sum(agent.metrics(), "jouleward_node_energy_joules_total", domain="cpu")
    assert end - start == pytest.approx(truth, rel=1e-6)


def test_model_fallback_without_rapl(tmp_path, agents, processes):
    empty_sys = tmp_path / "empty-sys"
    empty_sys.mkdir()
    labelled = subprocess.Popen(
        [sys.executable, "-c", "import time\nwhile True: sum(range(10000)); time.sleep(0.01)"],
        env={"JOULEWARD_JOB": "notebook", "PATH": "/usr/bin:/bin"},
    )
    processes.append(labelled)
    agent = AgentProcess(tmp_path / "state", sysfs=empty_sys, interval_s=0.2)
    agents.append(agent)
    wait_until(
        lambda: metric_sum(agent.metrics(), "jouleward_job_energy_joules_total", job_id="env-notebook") > 0,
        what="energy for the labelled process",
    )
    samples = agent.metrics()
    sources = {labels["source"] for labels, _ in metric_values(samples, "jouleward_node_energy_joules_total")}
    assert sources == {"model"}
    assert_conserved(samples)
    assert metric_sum(samples, "jouleward_sensor_up", sensor="cpu_model") == 1.0


def test_restart_resumes_totals_and_registered_jobs(tmp_path, rapl, processes, agents):
    state = tmp_path / "state"
    agent = AgentProcess(state, sysfs=tmp_path / "sys", interval_s=0.2)
    sleeper = subprocess.Popen(["sleep", "60"])
    short = subprocess.Popen(["sleep", "60"])
    processes.extend([sleeper, short])
    _, job = agent.control("POST", "/v1/jobs", {"name": "resumed", "pids": [sleeper.pid]})
    _, gone = agent.control("POST", "/v1/jobs", {"name": "gone", "pids": [short.pid]})
    agent.wait_ticks(3)
    before = agent.metrics()
    assert agent.stop() == 0
    short.kill()
    short.wait()
    time.sleep(1.0)  # the fixture keeps counting while the agent is down
    agent = AgentProcess(state, sysfs=tmp_path / "sys", interval_s=0.2)
    agents.append(agent)
    after = agent.metrics()
    for domain in ATTRIBUTED:
        assert metric_sum(after, "jouleward_node_energy_joules_total", domain=domain) >= metric_sum(
            before, "jouleward_node_energy_joules_total", domain=domain
        )
    # ~1 s of downtime at 105 W of packages is recovered as unattributed, not dropped
    recovered = metric_sum(after, "jouleward_unattributed_energy_joules_total", domain="cpu") - metric_sum(
        before, "jouleward_unattributed_energy_joules_total", domain="cpu"
    )
    assert recovered >= 80.0
    assert_conserved(after)
    status, resumed = agent.get(f"/v1/jobs/{job['id']}")
    assert status == 200 and resumed["running"] is True
    status, finished = agent.get(f"/v1/jobs/{gone['id']}")
    assert status == 200 and finished["running"] is False
    assert metric_values(after, "jouleward_job_finished", job_id=job["id"])[0][1] == 0.0


def test_control_api_rejects_bad_input_with_clear_4xx(tmp_path, agents):
    agent = AgentProcess(tmp_path / "state", interval_s=0.5)
    agents.append(agent)
    cases = [
        ({"name": "x", "pids": [4194000]}, 404, "no such process"),
        ({"name": "", "pids": [1]}, 422, "name"),
        ({"name": "a\nb", "pids": [1]}, 422, "control characters"),
        ({"name": "x" * 200, "pids": [1]}, 422, "longer than"),
        ({"name": "x", "pids": []}, 422, "pids"),
        ({"name": "x", "pids": ["one"]}, 422, "pids"),
        ({"name": "x", "pids": [1], "labels": {"bad key!": "v"}}, 422, "labels: key"),
        ("{not json", 400, "body: not valid JSON"),
    ]
    for body, code, message in cases:
        status, reply = agent.control("POST", "/v1/jobs", body)
        assert status == code, (body, reply)
        assert message in reply["detail"], reply
    assert agent.control("POST", "/v1/jobs/r-000000000000/finish")[0] == 404
    assert agent.get("/v1/jobs/nope")[0] == 404
    # control endpoints are not on the TCP listener
    status, _ = agent.get("/metrics")
    assert status == 200
    import http.client
    import json as _json

    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=5)
    conn.request(
        "POST", "/v1/jobs", body=_json.dumps({"name": "x", "pids": [1]}), headers={"Content-Type": "application/json"}
    )
    assert conn.getresponse().status == 405
    conn.close()
