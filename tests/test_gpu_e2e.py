"""The running agent with the fake NVML library: GPU energy per device and
per job on /metrics, conservation, allocated idle, a GPU lost mid-run."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakenvml.build import BuildError, FakeDevice, FakeProcess, FakeState, build
from tests.support import free_port, wait_until

REPO = Path(__file__).resolve().parents[1]
GPU_IDLE_W = 50.0


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = metrics_text(port)
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def pick(metrics, name, **labels):
    """Values of ``name`` whose labels include ``labels``, keyed by the full label set."""
    want = set(labels.items())
    return {
        dict(k[1]).get("device") or dict(k[1]).get("job_id") or dict(k[1]).get("domain") or "": v
        for k, v in metrics.items()
        if k[0] == name and want <= set(k[1])
    }


def wait_for(predicate, timeout_s=60.0, what="condition"):
    return wait_until(predicate, timeout_s, interval_s=0.2, what=what, ignore=(OSError,))


@pytest.fixture
def gpu_agent(tmp_path):
    try:
        library = build(tmp_path / "lib")
    except BuildError as exc:
        pytest.skip(f"fake NVML library cannot be built: {exc}")
    workers = {
        name: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", f"gpujob-{name}"])
        for name in ("a", "b", "parked")
    }
    now = time.monotonic()
    state = FakeState(
        devices=[
            FakeDevice(
                0,
                "GPU-0000aaaa-e2e",
                name="NVIDIA Fake H100",
                epoch_s=now,
                power_mw=250_000,
                util_gpu=80,
                mem_used=8 * 2**30,
            ),
            FakeDevice(
                1, "GPU-1111bbbb-e2e", epoch_s=now, power_mw=60_000, unsupported=("energy",), mem_used=2 * 2**30
            ),
            FakeDevice(2, "GPU-2222cccc-e2e", epoch_s=now, power_mw=100_000),
        ],
        processes=[
            FakeProcess(0, workers["a"].pid, mem=4 * 2**30, sm=60),
            FakeProcess(0, workers["b"].pid, mem=4 * 2**30, sm=20),
            FakeProcess(1, workers["parked"].pid, mem=2 * 2**30, sm=0),
        ],
    )
    state_path = tmp_path / "nvml-state"
    state.write(state_path)
    config = tmp_path / "jouleward.toml"
    config.write_text(
        f"gpu_idle_power_w = {GPU_IDLE_W}\ngpu_power_sample_interval_s = 0.05\n"
        + "".join(f'[[rules]]\nname = "{n}"\ncmdline = "gpujob-{n}$"\n' for n in workers)
    )
    (tmp_path / "sys").mkdir()
    port = free_port()
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": str(library.parent),
        "FAKENVML_STATE": str(state_path),
        "PYTHONPATH": str(REPO),
        "NODE_NAME": "gpu-node-7",
    }
    env.pop("CUDA_VISIBLE_DEVICES", None)
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "run",
            "--config",
            str(config),
            "--state-dir",
            str(tmp_path / "state"),
            "--listen",
            f"127.0.0.1:{port}",
            "--sysfs",
            str(tmp_path / "sys"),
            "--interval",
            "0.5",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield port, state, state_path, workers, agent, env, config
    finally:
        agent.terminate()
        try:
            agent.wait(timeout=20)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        for worker in workers.values():
            worker.kill()
            worker.wait()


def test_gpu_energy_per_job_conservation_idle_and_lost_gpu(gpu_agent):
    port, state, state_path, workers, agent, env, config = gpu_agent
    metrics = wait_for(
        lambda: (m := scrape(port)) and m.get(("jouleward_ticks_total", ())) >= 10 and m, what="ten ticks"
    )

    node = pick(metrics, "jouleward_node_energy_joules_total", domain="gpu")
    assert set(node) == {"gpu-0", "gpu-1", "gpu-2"}
    sources = {
        dict(k[1])["device"]: dict(k[1])["source"]
        for k in metrics
        if k[0] == "jouleward_node_energy_joules_total" and dict(k[1]).get("domain") == "gpu"
    }
    assert sources == {"gpu-0": "nvml_energy", "gpu-1": "nvml_power", "gpu-2": "nvml_energy"}
    power = pick(metrics, "jouleward_node_power_watts", domain="gpu")
    assert power["gpu-0"] == pytest.approx(250.0, rel=0.02)
    assert power["gpu-1"] == pytest.approx(60.0, rel=0.02)

    jobs = pick(metrics, "jouleward_job_energy_joules_total", domain="gpu")
    idle_jobs = pick(metrics, "jouleward_job_gpu_idle_energy_joules_total")
    active_a = jobs["rule-a"] - idle_jobs["rule-a"]
    active_b = jobs["rule-b"] - idle_jobs["rule-b"]
    assert active_a / active_b == pytest.approx(3.0, rel=0.02)
    # Memory is held 1:1 on gpu-0, so its idle is charged 1:1.
    assert idle_jobs["rule-a"] == pytest.approx(idle_jobs["rule-b"], rel=1e-6)
    # gpu-0's active energy is 200 of every 250 J; all of it is a's or b's.
    assert (active_a + active_b) / node["gpu-0"] == pytest.approx(200 / 250, rel=0.02)
    # The parked job alone holds gpu-1, at 0 % SM: it gets all of gpu-1, of
    # which the 50 W static part is its allocated idle.
    assert jobs["rule-parked"] == pytest.approx(node["gpu-1"], rel=1e-6)
    assert idle_jobs["rule-parked"] == pytest.approx(node["gpu-1"] * GPU_IDLE_W / 60.0, rel=0.02)
    # The JSON API tells the same story as the metrics.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/jobs/rule-parked", timeout=10) as response:
        parked = json.load(response)
    assert parked["gpu_idle_j"] > 0
    assert parked["gpu_idle_j"] == pytest.approx(parked["energy_j"]["gpu"] * GPU_IDLE_W / 60.0, rel=0.02)

    idle = pick(metrics, "jouleward_idle_energy_joules_total", domain="gpu")["gpu"]
    unattributed = pick(metrics, "jouleward_unattributed_energy_joules_total", domain="gpu")["gpu"]
    assert idle + unattributed + sum(jobs.values()) == pytest.approx(sum(node.values()), rel=1e-9)
    # gpu-2 is held by nobody: its 50 W idle goes to the node, its other 50 W
    # to unattributed (nothing else on gpu-0/1 is unattributed or node idle).
    assert idle == pytest.approx(node["gpu-2"] / 2, rel=0.02)
    assert unattributed == pytest.approx(node["gpu-2"] / 2, rel=0.02)

    # One GPU label set on every per-GPU family, the one dcgm-exporter writes: a join on UUID
    # (or Hostname and gpu) puts these series beside DCGM's.
    info = {dict(k[1])["gpu"]: dict(k[1]) for k in metrics if k[0] == "jouleward_gpu_info"}
    ident = {
        "gpu": "0",
        "UUID": "GPU-0000aaaa-e2e",
        "model_name": "NVIDIA Fake H100",
        "pci_bus_id": "00000000:17:00.0",
        "Hostname": "gpu-node-7",
    }
    assert info["0"] == {**ident, "device": "gpu-0", "mig": "0"}
    assert info["2"]["pci_bus_id"] == "00000000:19:00.0"
    key = tuple(sorted(ident.items()))
    for family in (
        "jouleward_gpu_utilization_ratio",
        "jouleward_gpu_memory_used_bytes",
        "jouleward_gpu_memory_total_bytes",
        "jouleward_gpu_power_limit_watts",
        "jouleward_gpu_processes",
    ):
        assert {tuple(sorted(dict(k[1]))) for k in metrics if k[0] == family} == {tuple(sorted(ident))}, family
    assert metrics[("jouleward_gpu_utilization_ratio", key)] == pytest.approx(0.8)
    assert metrics[("jouleward_gpu_memory_used_bytes", key)] == 8 * 2**30
    assert metrics[("jouleward_gpu_memory_total_bytes", key)] == 80 * 2**30
    assert metrics[("jouleward_gpu_power_limit_watts", key)] == 400.0
    assert metrics[("jouleward_node_info", (("hostname", socket.gethostname()), ("node", "gpu-node-7")))] == 1.0
    assert metrics[("jouleward_idle_power_watts", (("domain", "gpu"),))] == pytest.approx(3 * GPU_IDLE_W)
    assert pick(metrics, "jouleward_sensor_up", sensor="nvml") == {"gpu-0": 1.0, "gpu-1": 1.0, "gpu-2": 1.0}

    promtool = shutil.which("promtool")
    if promtool:
        text = metrics_text(port)
        assert "jouleward_job_gpu_idle_energy_joules_total{" in text and "jouleward_gpu_info{" in text
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), (
            check.stdout + check.stderr
        )

    # gpu-2 falls off the bus: the agent keeps serving, the others keep counting.
    state.devices[2].lost = 1
    state.write(state_path)
    lost = wait_for(
        lambda: (
            (m := scrape(port))
            and m.get(("jouleward_sensor_up", (("device", "gpu-2"), ("sensor", "nvml")))) == 0.0
            and m
        ),
        what="gpu-2 down",
    )
    later = wait_for(
        lambda: (
            (m := scrape(port))
            and m.get(("jouleward_ticks_total", ())) >= lost[("jouleward_ticks_total", ())] + 4
            and m
        ),
        what="four more ticks",
    )
    before = pick(lost, "jouleward_node_energy_joules_total", domain="gpu")
    after = pick(later, "jouleward_node_energy_joules_total", domain="gpu")
    assert after["gpu-0"] > before["gpu-0"] and after["gpu-1"] > before["gpu-1"]
    assert after["gpu-2"] == before["gpu-2"]  # a counter never goes backwards, and a lost GPU adds nothing
    assert pick(later, "jouleward_sensor_errors_total", sensor="nvml")["gpu-2"] >= 1
    assert agent.poll() is None

    doctor = subprocess.run(
        [sys.executable, "-m", "agent.cli", "doctor", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in doctor.stdout.splitlines() if "nvml" in line]
    assert any("gpu-0 NVIDIA Fake H100 GPU-0000aaaa-e2e: energy counter" in line for line in lines), doctor.stdout
    assert any("gpu-1" in line and "nvml_power" in line for line in lines), doctor.stdout
    assert any(line.startswith("--") and "gpu-2" in line and "GPU is lost" in line for line in lines), doctor.stdout
