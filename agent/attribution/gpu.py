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

So ``idle + unattributed + sum(jobs) == measured`` for every GPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agent.model import (
    SPLIT_MEMORY,
    SPLIT_SM,
    DeviceEnergy,
    DomainAttribution,
    GpuDeviceView,
    GpuProcess,
    GpuSplitMethod,
    split_method,
)

SPLIT_NONE = GpuSplitMethod.NONE
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
class GpuSplit:
    """How one GPU's tick energy was split."""

    device: str
    method: GpuSplitMethod
    measured_j: float
    idle_j: float  # to the node's idle counter
    unattributed_j: float
    jobs_j: dict[str, float] = field(default_factory=dict)  # active + allocated idle
    allocated_idle_j: dict[str, float] = field(default_factory=dict)  # part of jobs_j


@dataclass(frozen=True, slots=True)
class GpuAttribution:
    """The ``gpu`` domain for one tick: totals, allocated idle per job, per GPU."""

    total: DomainAttribution
    allocated_idle_j: dict[str, float]
    devices: tuple[GpuSplit, ...] = ()


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


def split_gpu(
    energy: DeviceEnergy,
    view: GpuDeviceView | None,
    idle_power_w: float | None,
    job_of: Mapping[int, str | None],
) -> GpuSplit:
    """Split one GPU's energy for one tick. ``job_of`` maps host pids to jobs."""
    measured = energy.energy_j if math.isfinite(energy.energy_j) and energy.energy_j > 0 else 0.0
    static_w = energy.idle_power_w if energy.idle_power_w is not None else idle_power_w
    idle_budget = 0.0
    if static_w is not None and math.isfinite(static_w) and static_w > 0 and energy.interval_s > 0:
        idle_budget = min(measured, static_w * energy.interval_s)
    active = measured - idle_budget
    processes = view.processes if view is not None and view.processes_known else ()
    if not processes:
        return GpuSplit(energy.device, SPLIT_NONE, measured, idle_budget, active)

    method = split_method(processes)
    active_shares = _shares(active, _weights(processes, method))
    idle_shares = _shares(idle_budget, _weights(processes, SPLIT_MEMORY))
    node_idle = unattributed = 0.0
    jobs: dict[str, float] = {}
    allocated: dict[str, float] = {}
    for process, active_j, idle_j in zip(processes, active_shares, idle_shares):
        job = job_of.get(process.pid)
        if job is None:
            unattributed += active_j
            node_idle += idle_j
            continue
        jobs[job] = jobs.get(job, 0.0) + active_j + idle_j
        allocated[job] = allocated.get(job, 0.0) + idle_j
    return GpuSplit(energy.device, method, measured, node_idle, unattributed, jobs, allocated)


def attribute_gpus(
    energies: Iterable[DeviceEnergy],
    views: Mapping[str, GpuDeviceView],
    idle_power_w: Mapping[str, float | None],
    job_of: Mapping[int, str | None],
) -> GpuAttribution:
    """Split every GPU's tick energy; ``views`` and ``idle_power_w`` are keyed
    by device label (``gpu-0``)."""
    splits = tuple(
        split_gpu(e, views.get(e.device), idle_power_w.get(e.device), job_of) for e in energies if e.domain == "gpu"
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
    return GpuAttribution(total=total, allocated_idle_j=allocated, devices=splits)


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
        return attribute_gpus(energies, views, idle, job_of), idle
