"""The fake NVML library answers the real bindings as the state file says."""

import time

import pynvml
import pytest

from tests.fakenvml.build import FakeDevice, FakeProcess


@pytest.fixture
def nvml(fake_nvml):
    pynvml.nvmlInit()
    yield fake_nvml
    pynvml.nvmlShutdown()


def test_identity_memory_limits_and_struct_layouts(nvml):
    nvml.state.devices = [
        FakeDevice(
            0,
            "GPU-11111111-aaaa",
            name="NVIDIA H100 80GB HBM3",
            util_gpu=42,
            util_mem=7,
            mem_total=80 * 2**30,
            mem_used=5 * 2**30,
            power_limit_mw=700_000,
        ),
        FakeDevice(1, "GPU-22222222-bbbb", mig=1),
    ]
    nvml.state.processes = [FakeProcess(0, 4242, mem=3 * 2**30), FakeProcess(1, 77, mem=2**20, gi=3, ci=0)]
    nvml.write()
    assert pynvml.nvmlDeviceGetCount() == 2
    assert pynvml.nvmlSystemGetDriverVersion() == "550.54.15"
    h0, h1 = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml.nvmlDeviceGetHandleByIndex(1)
    assert pynvml.nvmlDeviceGetUUID(h0) == "GPU-11111111-aaaa"
    assert pynvml.nvmlDeviceGetName(h0) == "NVIDIA H100 80GB HBM3"
    assert pynvml.nvmlDeviceGetIndex(h1) == 1
    util = pynvml.nvmlDeviceGetUtilizationRates(h0)
    assert (util.gpu, util.memory) == (42, 7)
    mem = pynvml.nvmlDeviceGetMemoryInfo(h0)
    assert (mem.total, mem.used, mem.free) == (80 * 2**30, 5 * 2**30, 75 * 2**30)
    assert pynvml.nvmlDeviceGetEnforcedPowerLimit(h0) == 700_000
    assert pynvml.nvmlDeviceGetMigMode(h0) == [0, 0]
    assert pynvml.nvmlDeviceGetMigMode(h1) == [1, 1]
    [p] = pynvml.nvmlDeviceGetComputeRunningProcesses(h0)
    assert (p.pid, p.usedGpuMemory) == (4242, 3 * 2**30)
    [q] = pynvml.nvmlDeviceGetComputeRunningProcesses(h1)
    assert (q.pid, q.usedGpuMemory, q.gpuInstanceId, q.computeInstanceId) == (77, 2**20, 3, 0)


def test_energy_counter_integrates_scripted_power(nvml):
    start = time.monotonic()
    nvml.state.devices = [FakeDevice(0, "GPU-a", energy_mj=5_000, epoch_s=start, power_mw=250_000)]
    nvml.write()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    before = time.monotonic()
    e0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    time.sleep(0.3)
    e1 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    after = time.monotonic()
    assert 5_000 + 250 * (before - start) * 1000 * 0.99 <= e0
    assert e1 - e0 == pytest.approx(250_000 * 0.3, rel=0.5)  # sleep is at least 0.3 s
    assert e1 - e0 <= 250_000 * (after - before) + 1
    assert pynvml.nvmlDeviceGetPowerUsage(h) == 250_000


def test_errors_lost_and_not_supported(nvml):
    nvml.state.devices = [FakeDevice(0, "GPU-a", unsupported=("energy", "procutil")), FakeDevice(1, "GPU-b", lost=1)]
    nvml.write()
    h0 = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetTotalEnergyConsumption(h0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetProcessUtilization(h0, 0)
    assert pynvml.nvmlDeviceGetPowerUsage(h0) == 100_000
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        pynvml.nvmlDeviceGetHandleByIndex(1)


def test_process_samples_newer_than_last_seen_else_not_found(nvml):
    nvml.state.devices = [FakeDevice(0, "GPU-a")]
    nvml.state.processes = [FakeProcess(0, 10, mem=1)]
    nvml.state.samples = [(0, 10, 1_000, 30), (0, 10, 2_000, 50), (0, 11, 3_000, 5)]
    nvml.write()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    got = pynvml.nvmlDeviceGetProcessUtilization(h, 1_500)
    assert [(s.pid, s.timeStamp, s.smUtil) for s in got] == [(10, 2_000, 50), (11, 3_000, 5)]
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetProcessUtilization(h, 3_000)


def test_live_samples_carry_current_time_and_mig_has_none(nvml):
    nvml.state.devices = [FakeDevice(0, "GPU-a"), FakeDevice(1, "GPU-b", mig=1)]
    nvml.state.processes = [FakeProcess(0, 10, sm=70), FakeProcess(1, 11, sm=70)]
    nvml.write()
    h0, h1 = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml.nvmlDeviceGetHandleByIndex(1)
    [s] = pynvml.nvmlDeviceGetProcessUtilization(h0, 0)
    assert s.pid == 10 and s.smUtil == 70
    assert abs(s.timeStamp / 1e6 - time.time()) < 5
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetProcessUtilization(h0, s.timeStamp)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetProcessUtilization(h1, 0)


def test_driver_not_loaded_fails_init(fake_nvml):
    fake_nvml.state.init = "driver_not_loaded"
    fake_nvml.write()
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        pynvml.nvmlInit()


def test_no_setter_exists(nvml):
    nvml.state.devices = [FakeDevice(0, "GPU-a")]
    nvml.write()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        pynvml.nvmlDeviceSetPowerManagementLimit(handle, 100_000)
    with pytest.raises(pynvml.NVMLError_FunctionNotFound):
        pynvml.nvmlDeviceSetMigMode(handle, 1)
