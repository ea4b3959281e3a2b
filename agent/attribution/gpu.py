"""Split each GPU's energy for one tick among jobs, idle and the host.

Pure arithmetic: no I/O, no clock. Per GPU and tick:

* idle energy is the GPU's static power times the tick, capped at what the GPU
  measured; the rest is active energy;
* active energy goes to the processes holding the GPU by their share of the
  summed SM utilisation (``sm``); where no process shows any, by GPU memory
  held (``memory``), else equally (``equal``);
* idle energy goes to the processes holding the GPU by the memory each holds
  (equally if none reports memory): nobody else can use a GPU that a job holds,
  so the job pays for it, and that part is also reported as the job's
  allocated-but-idle energy;
* shares of processes that belong to no job: active to unattributed, idle to
  the node's idle; a GPU nobody holds gives its idle to the node and its
  active energy to unattributed.

Where a scheduler's allocation is known (the kubelet's pod-resources API,
Slurm's job-mapping directory), idle follows the allocation instead of the
contexts: an allocated GPU's idle energy goes to the jobs allocated it, evenly
(time-sliced sharing), whether or not they hold a context; a GPU allocated to
nobody keeps its idle on the node; a job using a GPU it was not allocated pays
its active energy by use and is reported (``unallocated_use_j``). A MIG GPU is
split over its instances first (static power by slices, active energy by
instance utilisation where NVML or dcgm-exporter reports it, else by slices),
then each instance like a GPU of its own.

So ``idle + unattributed + sum(jobs) == measured`` for every GPU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from agent.model import (
    SPLIT_MEMORY,
    SPLIT_SM,
    DeviceEnergy,
    DomainAttribution,
    GpuAllocation,
    GpuDeviceView,
    GpuProcess,
    GpuSplitMethod,
    split_method,
)

SPLIT_NONE = GpuSplitMethod.NONE
# How a MIG GPU's active energy was shared among its instances: by each
# instance's utilisation (times its slices) as NVML or dcgm-exporter reports
# it, or by slices alone.
MigShareSource = Literal["nvml", "dcgm", "slices"]
# Ticks at or below this utilisation count as the GPU's low end of power.
LOW_UTILIZATION_RATIO = 0.05


@dataclass(frozen=True, slots=True)
class IdleObservations:
    """The lowest power the agent has seen one GPU draw."""

    unheld_min_w: float | None = None  # while no process held it
    low_utilization_min_w: float | None = None  # at utilisation <= LOW_UTILIZATION_RATIO


def observe_idle(
    seen: IdleObservations, power_w: float, utilization_ratio: float | None, held: bool
) -> IdleObservations:
    """Fold one tick's average power into the observations."""
    if not math.isfinite(power_w) or power_w < 0:
        return seen
    unheld = seen.unheld_min_w
    low = seen.low_utilization_min_w
    if not held:
        unheld = power_w if unheld is None else min(unheld, power_w)
    if utilization_ratio is not None and utilization_ratio <= LOW_UTILIZATION_RATIO:
        low = power_w if low is None else min(low, power_w)
    return IdleObservations(unheld_min_w=unheld, low_utilization_min_w=low)


def estimated_idle_power_w(seen: IdleObservations, configured_w: float | None = None) -> float | None:
    """Static power in force: configured, else power seen while unheld, else
    the low end of power against utilisation; None until anything is seen."""
    if configured_w is not None:
        return configured_w
    if seen.unheld_min_w is not None:
        return seen.unheld_min_w
    return seen.low_utilization_min_w


@dataclass(frozen=True, slots=True)
class InstanceSplit:
    """How one MIG device's share of its parent GPU's tick energy was split."""

    mig_uuid: str
    gpu_instance_id: int
    source: MigShareSource  # what split the parent's active energy among its instances
    energy_j: float  # this instance's share of the parent's measured energy
    idle_j: float  # to the node's idle counter
    unattributed_j: float
    jobs_j: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GpuSplit:
    """How one GPU's tick energy was split."""

    device: str
    method: GpuSplitMethod
    measured_j: float
    idle_j: float  # to the node's idle counter
    unattributed_j: float
    jobs_j: dict[str, float] = field(default_factory=dict)  # active + allocated idle
    allocated_idle_j: dict[str, float] = field(default_factory=dict)  # part of jobs_j
    # With allocation known: the idle of a GPU (or instance) allocated to
    # nobody (part of idle_j), and active energy of jobs using a GPU they
    # were not allocated (part of jobs_j).
    unallocated_idle_j: float = 0.0
    unallocated_use_j: dict[str, float] = field(default_factory=dict)
    allocated_jobs: tuple[str, ...] = ()
    instances: tuple[InstanceSplit, ...] = ()


@dataclass(frozen=True, slots=True)
class GpuAttribution:
    """The ``gpu`` domain for one tick: totals, allocated idle per job, per GPU."""

    total: DomainAttribution
    allocated_idle_j: dict[str, float]
    devices: tuple[GpuSplit, ...] = ()
    # Devices (GPUs, MIG devices, replicas' GPUs) allocated to each job this tick.
    allocated_devices: dict[str, int] = field(default_factory=dict)
    unmapped_allocations: int = 0  # allocations naming no GPU the agent sees


# -- allocation: the scheduler's device ids to GPUs and MIG devices ----------

_REPLICA = re.compile(r"::[0-9]+$")  # time-sliced replicas: GPU-<uuid>::<n>
_INDEX = re.compile(r"([0-9]+)(?:\.([0-9]+))?")  # Slurm's mapping files: 0, 0.3 (GPU instance 3)
_DRA_NAME = re.compile(r"gpu-([0-9]+)")  # the NVIDIA DRA driver's device names


@dataclass(frozen=True, slots=True)
class DeviceTarget:
    """Where an allocation lands: a GPU, or one of its MIG devices."""

    device: str  # gpu-<index>
    mig_uuid: str = ""  # "" for the whole GPU


def resolve_device(device_id: str, views: Mapping[str, GpuDeviceView]) -> DeviceTarget | None:
    """The GPU (and MIG device) a scheduler's device id names, or None."""
    base = _REPLICA.sub("", device_id.strip())
    for view in views.values():
        if view.uuid and view.uuid == base:
            return DeviceTarget(view.device)
        for instance in view.mig_instances:
            if instance.uuid == base:
                return DeviceTarget(view.device, instance.uuid)
    index = _INDEX.fullmatch(base)
    dra = _DRA_NAME.fullmatch(base)
    number = index.group(1) if index else dra.group(1) if dra else None
    if number is None:
        return None
    gpu = next((v for v in views.values() if v.index == int(number)), None)
    if gpu is None:
        return None
    if index and index.group(2) is not None:
        gi = int(index.group(2))
        found = next((i for i in gpu.mig_instances if i.gpu_instance_id == gi), None)
        return DeviceTarget(gpu.device, found.uuid) if found else None
    return DeviceTarget(gpu.device)


@dataclass(frozen=True, slots=True)
class AllocationMap:
    """Jobs allocated each GPU this tick: device label -> MIG UUID ("" for the
    whole GPU) -> job ids, sorted; and per job, how many devices."""

    by_device: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    devices_per_job: dict[str, int] = field(default_factory=dict)
    unmapped: int = 0


def allocation_map(allocations: Iterable[GpuAllocation], views: Mapping[str, GpuDeviceView]) -> AllocationMap:
    held: dict[str, dict[str, set[str]]] = {}
    per_job: dict[str, set[DeviceTarget]] = {}
    unmapped = 0
    for allocation in allocations:
        target = resolve_device(allocation.device_id, views)
        if target is None:
            unmapped += 1
            continue
        held.setdefault(target.device, {}).setdefault(target.mig_uuid, set()).add(allocation.job.id)
        per_job.setdefault(allocation.job.id, set()).add(target)
    by_device = {device: {mig: tuple(sorted(jobs)) for mig, jobs in parts.items()} for device, parts in held.items()}
    return AllocationMap(by_device, {job: len(targets) for job, targets in per_job.items()}, unmapped)


# -- the split ---------------------------------------------------------------


def _weights(processes: tuple[GpuProcess, ...], method: GpuSplitMethod) -> list[float]:
    if method == SPLIT_SM:
        return [max(p.sm_utilization_pct or 0.0, 0.0) for p in processes]
    if method == SPLIT_MEMORY:
        return [float(max(p.used_memory_bytes, 0)) for p in processes]
    return [1.0] * len(processes)


def _shares(total_j: float, weights: list[float]) -> list[float]:
    whole = sum(weights)
    if whole <= 0 or not math.isfinite(whole):
        return [total_j / len(weights)] * len(weights)
    return [total_j * (w / whole) for w in weights]


@dataclass
class _Part:
    """One GPU's (or MIG device's) split, built up."""

    idle_j: float = 0.0
    unattributed_j: float = 0.0
    jobs_j: dict[str, float] = field(default_factory=dict)
    allocated_idle_j: dict[str, float] = field(default_factory=dict)
    unallocated_idle_j: float = 0.0
    unallocated_use_j: dict[str, float] = field(default_factory=dict)

    def charge(self, job: str, joules: float) -> None:
        self.jobs_j[job] = self.jobs_j.get(job, 0.0) + joules


def _split_unit(
    part: _Part,
    active_j: float,
    idle_j: float,
    processes: tuple[GpuProcess, ...],
    job_of: Mapping[int, str | None],
    allocated: tuple[str, ...] | None,
) -> None:
    """Split one GPU's (or one MIG device's) active and idle energy into ``part``.

    ``allocated`` None: no allocation source, so the jobs holding a context
    pay the idle by their memory. Otherwise the allocated jobs pay it evenly,
    and a GPU allocated to nobody gives it to the node."""
    if processes:
        method = split_method(processes)
        for process, share in zip(processes, _shares(active_j, _weights(processes, method))):
            job = job_of.get(process.pid)
            if job is None:
                part.unattributed_j += share
                continue
            part.charge(job, share)
            if allocated is not None and job not in allocated:
                part.unallocated_use_j[job] = part.unallocated_use_j.get(job, 0.0) + share
    else:
        part.unattributed_j += active_j
    if allocated is None:
        if not processes:
            part.idle_j += idle_j
            return
        for process, share in zip(processes, _shares(idle_j, _weights(processes, SPLIT_MEMORY))):
            job = job_of.get(process.pid)
            if job is None:
                part.idle_j += share
                continue
            part.charge(job, share)
            part.allocated_idle_j[job] = part.allocated_idle_j.get(job, 0.0) + share
        return
    if not allocated:
        part.idle_j += idle_j
        part.unallocated_idle_j += idle_j
        return
    each = idle_j / len(allocated)
    for job in allocated:
        part.charge(job, each)
        part.allocated_idle_j[job] = part.allocated_idle_j.get(job, 0.0) + each


def _mig_split(
    part: _Part,
    view: GpuDeviceView,
    active_j: float,
    idle_j: float,
    job_of: Mapping[int, str | None],
    allocated: Mapping[str, tuple[str, ...]] | None,
) -> tuple[InstanceSplit, ...]:
    """Split a MIG GPU's energy over its instances, then each instance as a GPU.

    NVML measures only the parent. Static power is shared by slices; active
    energy by the instances' utilisation times slices where every instance
    reports one, else by slices."""
    instances = view.mig_instances
    slices = [float(i.slices) for i in instances]
    utilization = [i.utilization_ratio for i in instances]
    activity = [(u or 0.0) * s for u, s in zip(utilization, slices)] if None not in utilization else None
    source: MigShareSource = "slices"
    if activity is not None and sum(activity) > 0:
        source = "dcgm" if any(i.activity_source == "dcgm" for i in instances) else "nvml"
    idle_shares = _shares(idle_j, slices)
    active_shares = _shares(active_j, activity if source != "slices" and activity is not None else slices)
    out: list[InstanceSplit] = []
    for instance, instance_idle, instance_active in zip(instances, idle_shares, active_shares):
        unit = _Part()
        processes = tuple(p for p in view.processes if p.gpu_instance_id == instance.gpu_instance_id)
        jobs = None if allocated is None else allocated.get(instance.uuid, allocated.get("", ()))
        _split_unit(unit, instance_active, instance_idle, processes, job_of, jobs)
        out.append(
            InstanceSplit(
                instance.uuid,
                instance.gpu_instance_id,
                source,
                instance_idle + instance_active,
                unit.idle_j,
                unit.unattributed_j,
                dict(unit.jobs_j),
            )
        )
        part.idle_j += unit.idle_j
        part.unattributed_j += unit.unattributed_j
        part.unallocated_idle_j += unit.unallocated_idle_j
        for job, joules in unit.jobs_j.items():
            part.charge(job, joules)
        for job, joules in unit.allocated_idle_j.items():
            part.allocated_idle_j[job] = part.allocated_idle_j.get(job, 0.0) + joules
        for job, joules in unit.unallocated_use_j.items():
            part.unallocated_use_j[job] = part.unallocated_use_j.get(job, 0.0) + joules
    return tuple(out)


def split_gpu(
    energy: DeviceEnergy,
    view: GpuDeviceView | None,
    idle_power_w: float | None,
    job_of: Mapping[int, str | None],
    allocated: Mapping[str, tuple[str, ...]] | None = None,
) -> GpuSplit:
    """Split one GPU's energy for one tick. ``job_of`` maps host pids to jobs;
    ``allocated`` (MIG UUID, "" for the whole GPU, to job ids) is this GPU's
    allocation, None where no allocation source runs."""
    measured = energy.energy_j if math.isfinite(energy.energy_j) and energy.energy_j > 0 else 0.0
    static_w = energy.idle_power_w if energy.idle_power_w is not None else idle_power_w
    idle_budget = 0.0
    if static_w is not None and math.isfinite(static_w) and static_w > 0 and energy.interval_s > 0:
        idle_budget = min(measured, static_w * energy.interval_s)
    active = measured - idle_budget
    known = view is not None and view.processes_known
    processes = view.processes if view is not None and known else ()
    jobs_allocated = tuple(sorted({j for jobs in (allocated or {}).values() for j in jobs}))
    mig = view is not None and known and view.mig_enabled and bool(view.mig_instances)
    if allocated is None and not processes and not mig:
        return GpuSplit(energy.device, SPLIT_NONE, measured, idle_budget, active)
    part = _Part()
    instances: tuple[InstanceSplit, ...] = ()
    if mig and view is not None:
        instances = _mig_split(part, view, active, idle_budget, job_of, allocated)
    else:
        whole = None if allocated is None else allocated.get("", ())
        _split_unit(part, active, idle_budget, processes, job_of, whole)
    return GpuSplit(
        energy.device,
        split_method(processes) if processes else SPLIT_NONE,
        measured,
        part.idle_j,
        part.unattributed_j,
        part.jobs_j,
        part.allocated_idle_j,
        part.unallocated_idle_j,
        part.unallocated_use_j,
        jobs_allocated,
        instances,
    )


def attribute_gpus(
    energies: Iterable[DeviceEnergy],
    views: Mapping[str, GpuDeviceView],
    idle_power_w: Mapping[str, float | None],
    job_of: Mapping[int, str | None],
    allocations: Iterable[GpuAllocation] | None = None,
) -> GpuAttribution:
    """Split every GPU's tick energy; ``views`` and ``idle_power_w`` are keyed
    by device label (``gpu-0``). ``allocations`` None: no allocation source
    runs (not: none allocated)."""
    table = allocation_map(allocations, views) if allocations is not None else None
    splits = tuple(
        split_gpu(
            e,
            views.get(e.device),
            idle_power_w.get(e.device),
            job_of,
            None if table is None else table.by_device.get(e.device, {}),
        )
        for e in energies
        if e.domain == "gpu"
    )
    jobs: dict[str, float] = {}
    allocated: dict[str, float] = {}
    for split in splits:
        for job, joules in split.jobs_j.items():
            jobs[job] = jobs.get(job, 0.0) + joules
        for job, joules in split.allocated_idle_j.items():
            allocated[job] = allocated.get(job, 0.0) + joules
    total = DomainAttribution(
        domain="gpu",
        measured_j=sum(s.measured_j for s in splits),
        idle_j=sum(s.idle_j for s in splits),
        unattributed_j=sum(s.unattributed_j for s in splits),
        jobs_j=jobs,
    )
    return GpuAttribution(
        total=total,
        allocated_idle_j=allocated,
        devices=splits,
        allocated_devices=dict(table.devices_per_job) if table is not None else {},
        unmapped_allocations=table.unmapped if table is not None else 0,
    )


@dataclass
class GpuIdleTracker:
    """Carries each GPU's idle observations from tick to tick.

    State only (no I/O, no clock): the daemon owns one and feeds it every
    tick's readings; the arithmetic stays in the pure functions above.
    """

    configured_w: float | None = None
    seen: dict[str, IdleObservations] = field(default_factory=dict)

    def attribute(
        self,
        energies: list[DeviceEnergy],
        views: Mapping[str, GpuDeviceView],
        job_of: Mapping[int, str | None],
        allocations: Iterable[GpuAllocation] | None = None,
    ) -> tuple[GpuAttribution, dict[str, float | None]]:
        """Split this tick; also return the idle power in force per GPU."""
        idle: dict[str, float | None] = {}
        for reading in energies:
            if reading.domain != "gpu":
                continue
            view = views.get(reading.device)
            # A GPU whose process list is unknown may be held: it says nothing
            # about the unheld idle power.
            held = view is None or not view.processes_known or bool(view.processes)
            seen = observe_idle(
                self.seen.get(reading.device, IdleObservations()), reading.power_w, reading.utilization_ratio, held
            )
            self.seen[reading.device] = seen
            idle[reading.device] = estimated_idle_power_w(seen, self.configured_w)
        return attribute_gpus(energies, views, idle, job_of, allocations), idle
