import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.attribution.gpu import (
    IdleObservations,
    attribute_gpus,
    estimated_idle_power_w,
    observe_idle,
    split_gpu,
)
from agent.model import DeviceEnergy, GpuDeviceView, GpuProcess


def view(device="gpu-0", processes=(), known=True):
    return GpuDeviceView(
        index=int(device.split("-")[1]),
        device=device,
        uuid=f"GPU-{device}",
        name="Fake",
        utilization_ratio=0.5,
        memory_used_bytes=0,
        memory_total_bytes=80 * 2**30,
        power_limit_w=400.0,
        mig_enabled=False,
        processes=tuple(processes),
        processes_known=known,
    )


def energy(joules, device="gpu-0", interval_s=10.0, idle_power_w=None):
    return DeviceEnergy("gpu", device, "nvml_energy", joules, interval_s, idle_power_w=idle_power_w)


def test_active_energy_split_by_sm_share_and_idle_by_memory():
    procs = [GpuProcess(10, 3 * 2**30, 60.0), GpuProcess(11, 1 * 2**30, 20.0)]
    split = split_gpu(energy(2000.0), view(processes=procs), 50.0, {10: "a", 11: "b"})
    # idle 50 W x 10 s = 500 J by memory 3:1; active 1500 J by SM 3:1
    assert split.method == "sm"
    assert split.allocated_idle_j == pytest.approx({"a": 375.0, "b": 125.0})
    assert split.jobs_j == pytest.approx({"a": 375.0 + 1125.0, "b": 125.0 + 375.0})
    assert split.idle_j == 0.0 and split.unattributed_j == 0.0


def test_job_at_zero_sm_pays_its_memory_share_of_idle_only():
    procs = [GpuProcess(10, 2**30, 80.0), GpuProcess(11, 2**30, 0.0)]
    split = split_gpu(energy(1500.0), view(processes=procs), 50.0, {10: "busy", 11: "parked"})
    assert split.jobs_j["parked"] == pytest.approx(250.0)
    assert split.allocated_idle_j["parked"] == pytest.approx(250.0)
    assert split.jobs_j["busy"] == pytest.approx(250.0 + 1000.0)


def test_host_process_share_goes_to_unattributed_and_node_idle():
    procs = [GpuProcess(10, 2**30, 30.0), GpuProcess(99, 2**30, 10.0)]
    split = split_gpu(energy(1000.0), view(processes=procs), 20.0, {10: "a"})
    # idle 200 J: half to a, half (host) to node idle; active 800 J at 3:1
    assert split.jobs_j["a"] == pytest.approx(100.0 + 600.0)
    assert split.idle_j == pytest.approx(100.0)
    assert split.unattributed_j == pytest.approx(200.0)


def test_unheld_gpu_gives_idle_to_node_and_rest_to_unattributed():
    split = split_gpu(energy(700.0), view(), 50.0, {})
    assert (split.method, split.idle_j, split.unattributed_j, split.jobs_j) == ("none", 500.0, 200.0, {})


def test_fallbacks_memory_then_equal():
    by_memory = split_gpu(
        energy(100.0), view(processes=[GpuProcess(1, 300), GpuProcess(2, 100)]), 0.0, {1: "a", 2: "b"}
    )
    assert by_memory.method == "memory"
    assert by_memory.jobs_j == pytest.approx({"a": 75.0, "b": 25.0})
    equal = split_gpu(
        energy(90.0), view(processes=[GpuProcess(i, 0) for i in (1, 2, 3)]), None, {1: "a", 2: "b", 3: "a"}
    )
    assert equal.method == "equal"
    assert equal.jobs_j == pytest.approx({"a": 60.0, "b": 30.0})


def test_idle_is_capped_by_measured_energy():
    split = split_gpu(energy(100.0), view(processes=[GpuProcess(1, 10, 50.0)]), 50.0, {1: "a"})
    assert split.jobs_j == {"a": 100.0}
    assert split.allocated_idle_j == {"a": 100.0}


def test_unknown_process_list_charges_nobody():
    split = split_gpu(energy(100.0), view(processes=[GpuProcess(1, 10, 50.0)], known=False), 5.0, {1: "a"})
    assert split.jobs_j == {} and split.idle_j == 50.0 and split.unattributed_j == 50.0


def test_source_idle_power_wins_over_estimate():
    split = split_gpu(energy(100.0, idle_power_w=2.0), view(), 9.0, {})
    assert split.idle_j == 20.0


def test_idle_estimate_prefers_configured_then_unheld_then_low_utilisation():
    seen = IdleObservations()
    assert estimated_idle_power_w(seen) is None
    seen = observe_idle(seen, 90.0, 0.0, held=True)
    seen = observe_idle(seen, 300.0, 0.9, held=True)
    assert estimated_idle_power_w(seen) == 90.0
    seen = observe_idle(seen, 70.0, 0.3, held=False)
    seen = observe_idle(seen, 75.0, 0.0, held=False)
    assert estimated_idle_power_w(seen) == 70.0
    assert estimated_idle_power_w(seen, configured_w=40.0) == 40.0
    assert observe_idle(seen, float("nan"), 0.0, held=False) == seen


def test_totals_sum_devices_and_ignore_other_domains():
    energies = [
        energy(1000.0, "gpu-0"),
        energy(500.0, "gpu-1"),
        DeviceEnergy("cpu", "package-0", "rapl", 77.0, 10.0),
    ]
    views = {"gpu-0": view("gpu-0", [GpuProcess(5, 2**30, 10.0)]), "gpu-1": view("gpu-1", [GpuProcess(6, 2**30, 0.0)])}
    result = attribute_gpus(energies, views, {"gpu-0": 10.0, "gpu-1": 10.0}, {5: "a", 6: "a"})
    assert result.total.domain == "gpu"
    assert result.total.measured_j == 1500.0
    assert result.total.jobs_j == pytest.approx({"a": 1500.0})
    assert result.allocated_idle_j == pytest.approx({"a": 200.0})
    assert [d.device for d in result.devices] == ["gpu-0", "gpu-1"]


def test_negative_or_nan_energy_counts_as_zero():
    for bad in (-5.0, float("nan"), float("inf")):
        split = split_gpu(energy(bad), view(processes=[GpuProcess(1, 1, 1.0)]), 3.0, {1: "a"})
        assert split.measured_j == 0.0 and split.jobs_j == {"a": 0.0}


finite = st.floats(min_value=0, max_value=1e7, allow_nan=False, allow_infinity=False)
processes = st.lists(
    st.builds(
        GpuProcess,
        pid=st.integers(1, 12),
        used_memory_bytes=st.integers(0, 2**40),
        sm_utilization_pct=st.one_of(st.none(), st.floats(0, 100)),
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(
    gpus=st.lists(
        st.tuples(finite, st.floats(0.01, 3600), processes, st.one_of(st.none(), st.floats(0, 2000)), st.booleans()),
        min_size=1,
        max_size=4,
    ),
    jobs=st.dictionaries(st.integers(1, 12), st.one_of(st.none(), st.sampled_from(["a", "b", "c"]))),
)
def test_conservation_per_gpu_and_in_total(gpus, jobs):
    energies, views, idle = [], {}, {}
    for i, (joules, seconds, procs, idle_w, known) in enumerate(gpus):
        device = f"gpu-{i}"
        energies.append(energy(joules, device, seconds))
        views[device] = view(device, procs, known)
        idle[device] = idle_w
    result = attribute_gpus(energies, views, idle, jobs)
    for split, e in zip(result.devices, energies):
        parts = [split.idle_j, split.unattributed_j, *split.jobs_j.values(), *split.allocated_idle_j.values()]
        assert all(math.isfinite(p) and p >= 0 for p in parts)
        total = split.idle_j + split.unattributed_j + sum(split.jobs_j.values())
        assert total == pytest.approx(e.energy_j, rel=1e-9, abs=1e-9)
        for job, allocated in split.allocated_idle_j.items():
            assert allocated <= split.jobs_j[job] * (1 + 1e-12) + 1e-12
    t = result.total
    assert t.idle_j + t.unattributed_j + sum(t.jobs_j.values()) == pytest.approx(t.measured_j, rel=1e-9, abs=1e-9)


# -- with the scheduler's allocation -----------------------------------------

from agent.attribution.gpu import resolve_device  # noqa: E402
from agent.model import GpuAllocation, JobRef, MigInstanceView  # noqa: E402


def alloc(job, device_id, source="kubelet"):
    return GpuAllocation(JobRef(job, job, "pod"), device_id, source)


def mig_view(device="gpu-0", processes=(), utilizations=(None, None), slices=(3, 4)):
    instances = tuple(
        MigInstanceView(f"MIG-{device}-{gi}", gi, 0, s, u) for gi, (s, u) in enumerate(zip(slices, utilizations), 1)
    )
    return GpuDeviceView(
        index=int(device.split("-")[1]),
        device=device,
        uuid=f"GPU-{device}",
        name="Fake",
        utilization_ratio=None,
        memory_used_bytes=0,
        memory_total_bytes=80 * 2**30,
        power_limit_w=400.0,
        mig_enabled=True,
        processes=tuple(processes),
        mig_instances=instances,
    )


def test_device_ids_of_every_scheduler_map_to_gpus_and_mig_devices():
    views = {"gpu-0": view("gpu-0"), "gpu-1": mig_view("gpu-1")}
    assert resolve_device("GPU-gpu-0", views).device == "gpu-0"
    assert resolve_device("GPU-gpu-0::7", views).device == "gpu-0"  # a time-sliced replica
    assert resolve_device("MIG-gpu-1-2", views).mig_uuid == "MIG-gpu-1-2"
    assert resolve_device("MIG-gpu-1-2::1", views).mig_uuid == "MIG-gpu-1-2"
    assert resolve_device("0", views).device == "gpu-0"  # Slurm's mapping file by index
    assert resolve_device("1.1", views).mig_uuid == "MIG-gpu-1-1"  # ... and by GPU.instance
    assert resolve_device("gpu-1", views).device == "gpu-1"  # a DRA device name
    for unknown in ("GPU-elsewhere", "5", "1.9", "mlx5_0", ""):
        assert resolve_device(unknown, views) is None


def test_allocated_gpu_without_context_pays_idle_and_active_stays_unattributed():
    result = attribute_gpus([energy(1000.0)], {"gpu-0": view()}, {"gpu-0": 30.0}, {}, [alloc("nb", "GPU-gpu-0")])
    split = result.devices[0]
    assert split.jobs_j == {"nb": 300.0} and split.allocated_idle_j == {"nb": 300.0}
    assert split.unattributed_j == 700.0 and split.idle_j == 0.0
    assert result.allocated_devices == {"nb": 1}


def test_shared_allocation_splits_idle_evenly_whatever_the_memory():
    procs = [GpuProcess(1, 9 * 2**30, 10.0), GpuProcess(2, 2**30, 30.0)]
    allocations = [alloc("a", "GPU-gpu-0::0"), alloc("b", "GPU-gpu-0::1"), alloc("c", "GPU-gpu-0::2")]
    split = split_gpu(energy(1000.0), view(processes=procs), 30.0, {1: "a", 2: "b"}, {"": ("a", "b", "c")})
    assert split.allocated_idle_j == pytest.approx({"a": 100.0, "b": 100.0, "c": 100.0})
    assert split.jobs_j == pytest.approx({"a": 100.0 + 175.0, "b": 100.0 + 525.0, "c": 100.0})
    result = attribute_gpus(
        [energy(1000.0)], {"gpu-0": view(processes=procs)}, {"gpu-0": 30.0}, {1: "a", 2: "b"}, allocations
    )
    assert result.devices[0].jobs_j == pytest.approx(split.jobs_j)


def test_unallocated_gpu_keeps_idle_on_the_node_and_flags_its_users():
    procs = [GpuProcess(1, 2**30, 50.0)]
    split = split_gpu(energy(1000.0), view(processes=procs), 30.0, {1: "rogue"}, {})
    assert split.idle_j == 300.0 and split.unallocated_idle_j == 300.0
    assert split.jobs_j == {"rogue": 700.0} and split.allocated_idle_j == {}
    assert split.unallocated_use_j == {"rogue": 700.0}


def test_mig_instances_split_by_activity_where_reported_else_by_slices():
    by_slices = split_gpu(energy(700.0), mig_view(), 35.0, {}, {"MIG-gpu-0-1": ("t",)})
    assert [i.source for i in by_slices.instances] == ["slices", "slices"]
    assert [i.energy_j for i in by_slices.instances] == pytest.approx([300.0, 400.0])
    assert by_slices.allocated_idle_j == pytest.approx({"t": 350.0 * 3 / 7})
    assert by_slices.unallocated_idle_j == pytest.approx(350.0 * 4 / 7)
    by_activity = split_gpu(energy(700.0), mig_view(utilizations=(0.5, 0.25)), 35.0, {}, {})
    assert [i.source for i in by_activity.instances] == ["nvml", "nvml"]
    # Static 350 J by slices (150, 200), active 350 J by utilisation x slices (1.5 : 1.0).
    assert [i.energy_j for i in by_activity.instances] == pytest.approx([150.0 + 210.0, 200.0 + 140.0])
    # A process on instance 2 pays that instance's active energy.
    on_two = split_gpu(energy(700.0), mig_view(processes=[GpuProcess(5, 2**30, None, 2)]), 35.0, {5: "w"}, None)
    assert on_two.jobs_j["w"] == pytest.approx(350.0 * 4 / 7 + 200.0)  # active by slices, idle by its context


mig_processes = st.lists(
    st.builds(
        GpuProcess,
        pid=st.integers(1, 12),
        used_memory_bytes=st.integers(0, 2**40),
        sm_utilization_pct=st.one_of(st.none(), st.floats(0, 100)),
        gpu_instance_id=st.one_of(st.none(), st.integers(1, 3)),
    ),
    max_size=8,
)
device_ids = st.sampled_from(
    ["GPU-gpu-0", "GPU-gpu-0::1", "GPU-gpu-1", "MIG-gpu-1-1", "MIG-gpu-1-2::3", "0", "1.2", "gpu-1", "GPU-none"]
)


@settings(max_examples=300, deadline=None)
@given(
    joules=st.tuples(finite, finite),
    seconds=st.floats(0.01, 3600),
    procs=st.tuples(processes, mig_processes),
    utilizations=st.tuples(st.one_of(st.none(), st.floats(0, 1)), st.one_of(st.none(), st.floats(0, 1))),
    idle_w=st.one_of(st.none(), st.floats(0, 2000)),
    jobs=st.dictionaries(st.integers(1, 12), st.one_of(st.none(), st.sampled_from(["a", "b", "c"]))),
    allocations=st.one_of(
        st.none(), st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), device_ids), max_size=6)
    ),
)
def test_conservation_per_gpu_with_allocation_and_mig(joules, seconds, procs, utilizations, idle_w, jobs, allocations):
    energies = [energy(joules[0], "gpu-0", seconds), energy(joules[1], "gpu-1", seconds)]
    views = {"gpu-0": view("gpu-0", procs[0]), "gpu-1": mig_view("gpu-1", procs[1], utilizations)}
    given_allocations = None if allocations is None else [alloc(job, device) for job, device in allocations]
    result = attribute_gpus(energies, views, {"gpu-0": idle_w, "gpu-1": idle_w}, jobs, given_allocations)
    for split, e in zip(result.devices, energies):
        parts = [split.idle_j, split.unattributed_j, *split.jobs_j.values(), *split.allocated_idle_j.values()]
        assert all(math.isfinite(p) and p >= 0 for p in parts)
        assert split.idle_j + split.unattributed_j + sum(split.jobs_j.values()) == pytest.approx(
            e.energy_j, rel=1e-9, abs=1e-9
        )
        assert split.unallocated_idle_j <= split.idle_j * (1 + 1e-12) + 1e-12
        for job, used in split.unallocated_use_j.items():
            assert used <= split.jobs_j[job] * (1 + 1e-12) + 1e-12
        if split.instances:
            assert sum(i.energy_j for i in split.instances) == pytest.approx(e.energy_j, rel=1e-9, abs=1e-9)
            for instance in split.instances:
                inner = instance.idle_j + instance.unattributed_j + sum(instance.jobs_j.values())
                assert inner == pytest.approx(instance.energy_j, rel=1e-9, abs=1e-9)
    if given_allocations is not None:
        # Every idle joule of an allocated device goes to a job allocated it.
        allocated_jobs = {job for job, _ in allocations}
        assert set(result.allocated_idle_j) <= allocated_jobs
