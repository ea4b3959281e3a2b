"""The immutable view of one tick that exporters and the API read.

The sampler builds a new Snapshot after every tick and swaps a reference:
readers never lock, never trigger a sample, and never see half a tick.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.ledger.exposition import OVERFLOW_JOB
from agent.model import AllocationHealth, DeviceView, GpuDeviceView, JobView, SensorStatus

if TYPE_CHECKING:
    from agent.workloads.kubelet import KubeletHealth
    from agent.workloads.worksources import WorkSourceHealth

__all__ = [
    "OVERFLOW_JOB",
    "JobView",
    "DeviceView",
    "DurationCounts",
    "Health",
    "CarbonView",
    "GpuAllocationView",
    "Snapshot",
    "EMPTY_SNAPSHOT",
]


TICK_DURATION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True, slots=True)
class DurationCounts:
    """Tick durations per bucket (upper bounds in seconds; the last is +Inf)."""

    counts: tuple[int, ...] = (0,) * (len(TICK_DURATION_BUCKETS_S) + 1)
    sum_s: float = 0.0

    def observe(self, seconds: float) -> DurationCounts:
        index = next(
            (i for i, bound in enumerate(TICK_DURATION_BUCKETS_S) if seconds <= bound), len(TICK_DURATION_BUCKETS_S)
        )
        counts = list(self.counts)
        counts[index] += 1
        return DurationCounts(tuple(counts), self.sum_s + seconds)

    def buckets(self) -> list[tuple[str, int]]:
        return list(zip([*map(str, TICK_DURATION_BUCKETS_S), "+Inf"], self.counts))


@dataclass(frozen=True, slots=True)
class Health:
    ticks: int = 0
    last_tick_duration_s: float = 0.0
    tick_durations: DurationCounts = DurationCounts()
    sensors: tuple[SensorStatus, ...] = ()
    sensor_errors: dict[tuple[str, str], int] = field(default_factory=dict)
    processes: int = 0
    jobs_running: int = 0
    jobs_finished: int = 0
    ledger_flush_unix: float | None = None
    ledger_errors: int = 0
    kubelet: KubeletHealth | None = None  # None when pod metadata is not configured
    work_sources: tuple[WorkSourceHealth, ...] = ()  # serving engines' endpoints being read


@dataclass(frozen=True, slots=True)
class CarbonView:
    """The grid intensity in force over the last tick, and the node's emissions."""

    grams_per_kwh: float = 0.0
    zone: str = ""
    source: str = ""
    pue: float = 1.0
    node_emissions_g: float = 0.0
    provider_errors: int = 0


@dataclass(frozen=True, slots=True)
class GpuAllocationView:
    """GPUs as the scheduler allocated them: sources, the last tick's
    allocation, and what the allocation left to the node since start."""

    sources: tuple[AllocationHealth, ...] = ()
    jobs_per_gpu: Mapping[str, int] = field(default_factory=dict)  # device label -> jobs allocated it now
    devices_per_job: Mapping[str, int] = field(default_factory=dict)  # job id -> GPUs or MIG devices now
    unallocated_idle_j: Mapping[str, float] = field(default_factory=dict)  # device label -> joules since start
    unallocated_use_j: Mapping[str, float] = field(default_factory=dict)  # device label -> joules since start
    unallocated_users: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # device -> job ids, last tick
    unseen_devices: int = 0  # allocations naming no GPU the agent sees, last tick
    # (device label, GPU instance id, MIG UUID, source) -> joules since start
    instance_energy_j: Mapping[tuple[str, int, str, str], float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Snapshot:
    timestamp_unix: float
    interval_s: float
    cpu_utilization_ratio: float
    devices: tuple[DeviceView, ...]
    idle_j: dict[str, float]
    unattributed_j: dict[str, float]
    idle_power_w: dict[str, float]
    jobs: tuple[JobView, ...]  # exported jobs, the overflow aggregate last
    health: Health
    carbon: CarbonView = CarbonView()
    gpus: tuple[GpuDeviceView, ...] = ()  # what NVML showed on the last tick
    # Work read from serving engines since the agent started: job id -> (unit, model) -> count.
    served_work: Mapping[str, Mapping[tuple[str, str], float]] = field(default_factory=dict)
    gpu_allocation: GpuAllocationView = GpuAllocationView()

    def job(self, job_id: str) -> JobView | None:
        return next((job for job in self.jobs if job.ref.id == job_id), None)


EMPTY_SNAPSHOT = Snapshot(0.0, 0.0, 0.0, (), {}, {}, {}, (), Health())
