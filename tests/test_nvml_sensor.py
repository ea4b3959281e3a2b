"""The NVML sensor against the fake library, through the real bindings."""

import ctypes.util
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.attribution.gpu import attribute_gpus
from agent.model import TickContext
from agent.sensors.nvml import NvmlSensor, NvmlUnavailable, select_visible
from tests.fakenvml.build import BuildError, FakeDevice, FakeProcess, FakeState, build

REPO = Path(__file__).resolve().parents[1]
CTX = TickContext(interval_s=0.5, cpu_utilization_ratio=0.1, cpu_busy_s=0.1)


@pytest.fixture
def sleepers():
    procs = [subprocess.Popen(["sleep", "300"]) for _ in range(3)]
    yield [p.pid for p in procs]
    for p in procs:
        p.kill()
        p.wait()


@pytest.fixture
def sensor_factory(fake_nvml):
    made = []

    def make(**kwargs):
        sensor = NvmlSensor(**kwargs)
        made.append(sensor)
        return sensor

    yield make
    for sensor in made:
        sensor.close()


def test_two_processes_at_3_to_1_sm_share_split_active_energy_3_to_1(fake_nvml, sensor_factory, sleepers):
    a, b, parked = sleepers
    fake_nvml.state.devices = [
        FakeDevice(0, "GPU-aaaa", epoch_s=time.monotonic(), power_mw=250_000, util_gpu=80),
        FakeDevice(1, "GPU-bbbb", epoch_s=time.monotonic(), power_mw=60_000, util_gpu=0),
    ]
    fake_nvml.state.processes = [
        FakeProcess(0, a, mem=4 * 2**30, sm=60),
        FakeProcess(0, b, mem=4 * 2**30, sm=20),
        FakeProcess(1, parked, mem=2 * 2**30, sm=0),
    ]
    fake_nvml.write()
    sensor = sensor_factory()
    job_of = {a: "job-a", b: "job-b", parked: "job-parked"}
    assert sensor.sample(CTX) == []
    jobs, allocated, measured, seconds = {}, {}, {}, {}
    for _ in range(4):
        time.sleep(0.25)
        energies = sensor.sample(CTX)
        views = sensor.views()
        assert {d: v.split_method for d, v in views.items()} == {"gpu-0": "sm", "gpu-1": "memory"}
        result = attribute_gpus(energies, views, {"gpu-0": 50.0, "gpu-1": 50.0}, job_of)
        for split, energy in zip(result.devices, energies):
            assert energy.source == "nvml_energy"
            measured[split.device] = measured.get(split.device, 0.0) + split.measured_j
            seconds[split.device] = seconds.get(split.device, 0.0) + energy.interval_s
            assert split.idle_j + split.unattributed_j + sum(split.jobs_j.values()) == pytest.approx(split.measured_j)
        for job, joules in result.total.jobs_j.items():
            jobs[job] = jobs.get(job, 0.0) + joules
        for job, joules in result.allocated_idle_j.items():
            allocated[job] = allocated.get(job, 0.0) + joules
    active_a = jobs["job-a"] - allocated["job-a"]
    active_b = jobs["job-b"] - allocated["job-b"]
    assert active_a / active_b == pytest.approx(3.0, rel=0.02)
    assert measured["gpu-0"] == pytest.approx(250.0 * seconds["gpu-0"], rel=0.02)
    assert active_a + active_b == pytest.approx(200.0 * seconds["gpu-0"], rel=0.02)
    # The parked job holds gpu-1 at 0 % SM: all its energy is allocated idle.
    assert allocated["job-parked"] == pytest.approx(50.0 * seconds["gpu-1"], rel=0.02)
    assert jobs["job-parked"] == pytest.approx(measured["gpu-1"], rel=1e-9)
    view = sensor.views()["gpu-0"]
    assert (view.uuid, view.utilization_ratio, view.power_limit_w, view.mig_enabled) == ("GPU-aaaa", 0.8, 400.0, False)
    assert {p.pid: p.used_memory_bytes for p in view.processes} == {a: 4 * 2**30, b: 4 * 2**30}


def test_a_tick_too_soon_for_new_samples_keeps_the_last_split(fake_nvml, sensor_factory):
    fake_nvml.state.devices = [FakeDevice(0, "GPU-q", epoch_s=time.monotonic())]
    fake_nvml.state.processes = [FakeProcess(0, 10, mem=1, sm=75), FakeProcess(0, 11, mem=1, sm=25)]
    fake_nvml.write()
    sensor = sensor_factory()
    sensor.sample(CTX)
    sensor.sample(CTX)  # within the same 100 ms sample period of the fake: no new samples
    assert {p.pid: p.sm_utilization_pct for p in sensor.views()["gpu-0"].processes} == {10: 75.0, 11: 25.0}
    fake_nvml.state.processes = [FakeProcess(0, 10, mem=1), FakeProcess(0, 11, mem=1)]  # nothing runs now
    fake_nvml.write()
    time.sleep(1.3)
    sensor.sample(CTX)
    view = sensor.views()["gpu-0"]
    assert [p.sm_utilization_pct for p in view.processes] == [0.0, 0.0] and view.split_method == "memory"


def _truth_j(device: FakeDevice, t0: float, t1: float) -> float:
    w = 2 * math.pi / device.wave_period_s

    def energy(t):
        x = t - device.epoch_s
        return device.power_mw * x + device.wave_mw / w * (1 - math.cos(w * x))

    return (energy(t1) - energy(t0)) / 1000.0


def test_counterless_gpu_integrated_from_power_matches_truth(fake_nvml, sensor_factory):
    device = FakeDevice(
        0,
        "GPU-cccc",
        epoch_s=time.monotonic(),
        power_mw=200_000,
        wave_mw=120_000,
        wave_period_s=2.5,
        unsupported=("energy",),
    )
    fake_nvml.state.devices = [device]
    fake_nvml.write()
    sensor = sensor_factory(power_sample_interval_s=0.05)
    before_first = time.monotonic()
    assert sensor.sample(CTX) == []
    after_first = time.monotonic()
    total = 0.0
    for _ in range(8):
        time.sleep(0.45)
        before_last = time.monotonic()
        [energy] = sensor.sample(CTX)
        after_last = time.monotonic()
        assert energy.source == "nvml_power" and energy.energy_j > 0
        total += energy.energy_j
    low = _truth_j(device, after_first, before_last)
    high = _truth_j(device, before_first, after_last)
    assert low * 0.98 <= total <= high * 1.02


def test_counter_reset_is_not_negative_energy(fake_nvml, sensor_factory):
    fake_nvml.state.devices = [FakeDevice(0, "GPU-a", energy_mj=10_000)]
    fake_nvml.write()
    sensor = sensor_factory()
    sensor.sample(CTX)
    fake_nvml.state.devices[0].energy_mj = 12_500
    fake_nvml.write()
    assert [e.energy_j for e in sensor.sample(CTX)] == [2.5]
    fake_nvml.state.devices[0].energy_mj = 400  # driver reloaded: counter restarted
    fake_nvml.write()
    assert [e.energy_j for e in sensor.sample(CTX)] == [0.4]


def test_lost_gpu_goes_down_and_the_others_keep_counting(fake_nvml, sensor_factory):
    fake_nvml.state.devices = [FakeDevice(0, "GPU-a", energy_mj=0), FakeDevice(1, "GPU-b", energy_mj=0)]
    fake_nvml.write()
    sensor = sensor_factory()
    sensor.sample(CTX)

    def step(lost: bool, add_mj: int):
        for d in fake_nvml.state.devices:
            d.energy_mj += add_mj
        fake_nvml.state.devices[1].lost = int(lost)
        fake_nvml.write()
        return {e.device: e.energy_j for e in sensor.sample(CTX)}

    assert step(False, 1000) == {"gpu-0": 1.0, "gpu-1": 1.0}
    assert step(True, 1000) == {"gpu-0": 1.0}
    status = {s.device: s for s in sensor.status()}
    assert status["gpu-0"].up and not status["gpu-1"].up
    assert "lost" in status["gpu-1"].reason.lower()
    assert set(sensor.views()) == {"gpu-0"}
    assert step(False, 1000) == {"gpu-0": 1.0}  # back: baseline first
    assert step(False, 1000) == {"gpu-0": 1.0, "gpu-1": 1.0}
    assert all(s.up for s in sensor.status())


def test_visible_devices_by_index_and_uuid(fake_nvml, sensor_factory):
    fake_nvml.state.devices = [FakeDevice(i, f"GPU-{i}{i}{i}-x", energy_mj=0) for i in range(3)]
    fake_nvml.write()
    sensor = sensor_factory(visible_devices="2,GPU-000")
    sensor.sample(CTX)
    assert sorted(s.device for s in sensor.status()) == ["gpu-0", "gpu-2"]
    assert sorted(sensor.views()) == ["gpu-0", "gpu-2"]


def test_select_visible_follows_cuda_rules():
    devices = [(0, "GPU-aa11"), (1, "GPU-ab22"), (2, "GPU-cc33")]
    assert select_visible(None, devices) == [0, 1, 2]
    assert select_visible("", devices) == []
    assert select_visible("2, 0", devices) == [2, 0]
    assert select_visible("GPU-cc,1", devices) == [2, 1]
    assert select_visible("1,7,2", devices) == [1]  # an unknown entry ends the list
    assert select_visible("GPU-a,2", devices) == []  # an ambiguous prefix names no device


def test_mig_gpu_splits_by_memory_and_reports_instances(fake_nvml, sensor_factory, sleepers):
    a, b, _ = sleepers
    fake_nvml.state.devices = [FakeDevice(0, "GPU-m", mig=1, epoch_s=time.monotonic())]
    fake_nvml.state.processes = [
        FakeProcess(0, a, mem=3 * 2**30, sm=90, gi=1),
        FakeProcess(0, b, mem=2**30, sm=10, gi=2),
    ]
    fake_nvml.write()
    sensor = sensor_factory()
    sensor.sample(CTX)
    view = sensor.views()["gpu-0"]
    assert view.mig_enabled and view.split_method == "memory"
    assert {p.pid: (p.gpu_instance_id, p.sm_utilization_pct) for p in view.processes} == {a: (1, None), b: (2, None)}
    assert "per-process utilisation unavailable" in sensor.status()[0].reason


def test_unreadable_process_list_keeps_energy_counting(fake_nvml, sensor_factory):
    fake_nvml.state.devices = [FakeDevice(0, "GPU-p", energy_mj=0, unsupported=("procs",))]
    fake_nvml.state.processes = [FakeProcess(0, 1, mem=5)]
    fake_nvml.write()
    sensor = sensor_factory()
    sensor.sample(CTX)
    fake_nvml.state.devices[0].energy_mj = 3000
    fake_nvml.write()
    assert [e.energy_j for e in sensor.sample(CTX)] == [3.0]
    [status] = sensor.status()
    assert status.up and "process list unavailable" in status.reason
    assert sensor.views()["gpu-0"].processes_known is False


def test_init_failure_is_reported_not_raised_as_nvml_error(fake_nvml):
    fake_nvml.state.init = "driver_not_loaded"
    fake_nvml.write()
    with pytest.raises(NvmlUnavailable, match="Driver Not Loaded"):
        NvmlSensor()


def _run_child(code: str, env: dict) -> subprocess.CompletedProcess:
    env = {**env, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_old_driver_without_v3_process_list_still_lists_processes(tmp_path):
    try:
        library = build(tmp_path / "lib", without_process_v3=True)
    except BuildError as exc:
        pytest.skip(str(exc))
    state = tmp_path / "state"
    FakeState(devices=[FakeDevice(0, "GPU-old")], processes=[FakeProcess(0, 4321, mem=2**20, sm=40)]).write(state)
    code = (
        "from agent.sensors.nvml import NvmlSensor\n"
        "from agent.model import TickContext\n"
        "s = NvmlSensor(); s.sample(TickContext(1, 0, 0))\n"
        "v = s.views()['gpu-0']; print(v.processes_known, [(p.pid, p.sm_utilization_pct) for p in v.processes])\n"
    )
    env = {**os.environ, "LD_LIBRARY_PATH": str(library.parent), "FAKENVML_STATE": str(state)}
    result = _run_child(code, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True [(4321, 40.0)]"


def test_missing_library_is_a_clear_doctor_line():
    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("a real NVML library is installed here")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD")}
    result = _run_child("from agent.sensors.nvml import diagnose; print(diagnose())", env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[(False, 'NVML did not initialise: NVML Shared Library Not Found')]")
