"""docs/metrics.md is the contract: every family the agent exports is in it."""

from __future__ import annotations

import re
import subprocess
import time

from prometheus_client.parser import text_string_to_metric_families

from tests.fakenvml.build import BuildError, FakeDevice, FakeProcess, FakeState, build
from tests.support import REPO, AgentProcess, two_socket_server

DOC = (REPO / "docs" / "metrics.md").read_text()
DOCUMENTED = set(re.findall(r"`(jouleward_[a-z0-9_]+)(?:\{[^`]*\})?`", DOC))


def test_every_exported_family_is_documented(tmp_path, processes, agents):
    tree = two_socket_server(tmp_path / "sys")
    env = {}
    try:
        library = build(tmp_path / "fakenvml")
        worker = subprocess.Popen(["sleep", "120"])
        processes.append(worker)
        state = tmp_path / "nvml-state"
        FakeState(
            devices=[
                FakeDevice(
                    0, "GPU-0000aaaa-doc", epoch_s=time.monotonic(), power_mw=150_000, util_gpu=40, mem_used=2**30
                )
            ],
            processes=[FakeProcess(0, worker.pid, mem=2**30, sm=40)],
        ).write(state)
        env = {"LD_LIBRARY_PATH": str(library.parent), "FAKENVML_STATE": str(state)}
    except BuildError:
        worker = subprocess.Popen(["sleep", "120"])
        processes.append(worker)
    agent = AgentProcess(tmp_path / "state", sysfs=tmp_path / "sys", interval_s=0.2, env=env)
    agents.append(agent)
    status, job = agent.control("POST", "/v1/jobs", {"name": "doc", "pids": [worker.pid], "labels": {"team": "x"}})
    assert status == 201
    assert agent.control("POST", f"/v1/jobs/{job['id']}/work", {"unit": "samples", "count": 8})[0] == 200
    tree.zones["intel-rapl:0"].add_j(5)
    agent.wait_ticks(3)
    text = agent.metrics_text()
    families = {family.name for family in text_string_to_metric_families(text)}
    # The parser names counter families without their _total suffix.
    exported = {name for name in families if name.startswith("jouleward_")}
    with_suffix = {f"{name}_total" if f"{name}_total" in text else name for name in exported}
    assert len(with_suffix) >= 25, sorted(with_suffix)
    undocumented = sorted(name for name in with_suffix if name not in DOCUMENTED)
    assert undocumented == [], f"exported but not in docs/metrics.md: {undocumented}"
    if env:
        assert "jouleward_job_gpu_idle_energy_joules_total" in with_suffix
