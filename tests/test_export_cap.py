"""The cap on exported jobs: overflow aggregated, never lost, never backwards."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from agent.config import build
from agent.pipeline.daemon import Agent
from exporters.prometheus import render_snapshot
from tests.support import metric_sum, metric_values, parse_metrics, start_burner


def test_jobs_past_the_cap_go_to_overflow_and_totals_are_conserved(tmp_path, processes):
    config = replace(
        build(flags={"state_dir": str(tmp_path / "state"), "sysfs": str(tmp_path)}, environ={}),
        max_exported_jobs=2,
        finished_job_retention_s=0.0,
    )
    for index in range(5):
        processes.append(start_burner(0.05, env={"JOULEWARD_JOB": f"job-{index}"}))
    time.sleep(0.5)
    agent = Agent(config)
    previous_other = {}
    try:
        for _ in range(8):
            agent.tick()
            time.sleep(0.15)
            samples = parse_metrics(render_snapshot(agent.snapshot).decode())
            exported = {labels["job_id"] for labels, _ in metric_values(samples, "jouleward_job_cpu_seconds_total")}
            ours = {job for job in exported if job.startswith("env-job-")}
            assert len(ours) <= 2
            if len(agent.ledger.jobs) > 2:
                assert "_other" in exported
            node = metric_sum(samples, "jouleward_node_energy_joules_total", domain="cpu")
            parts = (
                metric_sum(samples, "jouleward_idle_energy_joules_total", domain="cpu")
                + metric_sum(samples, "jouleward_unattributed_energy_joules_total", domain="cpu")
                + metric_sum(samples, "jouleward_job_energy_joules_total", domain="cpu")
            )
            assert parts == pytest.approx(node, rel=1e-9)
            other = {
                labels["domain"]: v
                for labels, v in metric_values(samples, "jouleward_job_energy_joules_total", job_id="_other")
            }
            for domain, value in other.items():
                assert value >= previous_other.get(domain, 0.0)
            previous_other = other
        # the overflow carries real energy from the jobs it holds
        assert previous_other.get("cpu", 0.0) > 0
        # Jobs end and leave the exposition after the retention; the overflow keeps what its jobs used.
        for proc in processes:
            proc.kill()
            proc.wait()
        for _ in range(3):
            agent.tick()
            time.sleep(0.05)
        samples = parse_metrics(render_snapshot(agent.snapshot).decode())
        final_other = metric_sum(samples, "jouleward_job_energy_joules_total", job_id="_other", domain="cpu")
        assert final_other >= previous_other["cpu"]
        assert not {l["job_id"] for l, _ in metric_values(samples, "jouleward_job_cpu_seconds_total")} - {"_other"}
    finally:
        agent.close()


def test_no_label_named_job_and_no_nan(tmp_path):
    agent = Agent(build(flags={"state_dir": str(tmp_path / "s"), "sysfs": str(tmp_path)}, environ={}))
    try:
        agent.tick()
        time.sleep(0.1)
        agent.tick()
        text = render_snapshot(agent.snapshot).decode()
    finally:
        agent.close()
    for name, labels, value in parse_metrics(text):
        assert "job" not in labels
        assert value == value and value >= 0, (name, labels, value)
