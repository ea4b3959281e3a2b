"""Small frozen dataclasses at the seams between pipeline stages.

Units live in field names: ``energy_j`` joules, ``power_w`` watts, ``cpu_s``
CPU-seconds, ``interval_s`` seconds of the monotonic clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, NamedTuple

Domain = Literal["cpu", "dram", "gpu", "platform", "board"]
# How a device's energy was measured.
EnergySource = Literal["rapl", "hwmon", "hwmon_power", "model", "nvml_energy", "nvml_power"]
# How a job was found: first match wins, in this order (overflow: the
# aggregate of jobs beyond the export cap).
JobKind = Literal["registered", "pod", "slurm", "systemd", "env", "rule", "overflow"]

# Domains whose energy is attributed to jobs. Other domains (``platform`` from
# RAPL psys, ``board`` from hwmon) are exported per node only: they overlap the
# attributed ones, so attributing them too would count energy twice.
ATTRIBUTED_DOMAINS = ("cpu", "dram", "gpu")


@dataclass(frozen=True, slots=True)
class DeviceEnergy:
    """Energy one device used during one tick."""

    domain: Domain
    device: str  # package-0, dram-0, gpu-0, ...
    source: EnergySource
    energy_j: float
    interval_s: float
    # Static power the source itself knows (a power model does); None means the
    # attribution stage estimates it from its own observations.
    idle_power_w: float | None = None
    # The device's own busy ratio over the tick where the source reports one
    # (GPU SM utilisation); CPU domains use the node CPU utilisation instead.
    utilization_ratio: float | None = None

    @property
    def power_w(self) -> float:
        return self.energy_j / self.interval_s if self.interval_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class SensorStatus:
    """Health of one sensor device: up, or down with the reason why."""

    sensor: str  # powercap, hwmon, cpu_model, nvml
    device: str
    up: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class TickContext:
    """What the sensors may need to know about the tick being sampled."""

    interval_s: float
    cpu_utilization_ratio: float  # node-wide busy share of all CPUs, 0..1
    cpu_busy_s: float  # node-wide busy CPU-seconds in the interval


class ProcessKey(NamedTuple):
    """A process identity that survives pid reuse: pid plus its start time.

    A named tuple rather than a dataclass: the scan builds, hashes and compares
    one per process per tick, and a tuple does all three in C.
    """

    pid: int
    start_ticks: int  # field 22 of /proc/<pid>/stat, clock ticks since boot


@dataclass(frozen=True, slots=True)
class JobRef:
    """What energy is attributed to. ``kind`` says how the job was found."""

    id: str
    name: str
    kind: JobKind
    namespace: str = ""


@dataclass(frozen=True, slots=True)
class DomainAttribution:
    """How one domain's measured energy for one tick was split.

    Invariant: idle_j + unattributed_j + sum(jobs_j.values()) == measured_j.
    """

    domain: str
    measured_j: float
    idle_j: float
    unattributed_j: float
    jobs_j: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeviceView:
    """One device's cumulative energy, and its power over the last tick."""

    domain: str
    device: str
    source: str
    energy_j: float
    power_w: float


def _sum(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    if not b:
        return a if isinstance(a, dict) else dict(a)
    total = dict(a)
    for key, value in b.items():
        total[key] = total.get(key, 0.0) + value
    return total


@dataclass(frozen=True, slots=True)
class JobTotals:
    """Everything one job (or a sum of jobs: the overflow) has accumulated.

    The one per-job totals type: the ledger books into it, the snapshot, the
    overflow aggregate, the API and the reports read it. A new per-job figure
    is a field here and a term in ``__add__``; the ledger books and stores it,
    an exporter shows it. Values are never mutated once built.
    """

    energy_j: dict[str, float] = field(default_factory=dict)  # by domain
    cpu_s: float = 0.0
    work_units: dict[str, float] = field(default_factory=dict)  # reported work, by unit
    emissions_g: float = 0.0  # gCO2eq, PUE included, each tick at the intensity in force
    gpu_idle_j: float = 0.0  # allocated-but-idle GPU energy, part of energy_j["gpu"]

    def __add__(self, other: JobTotals) -> JobTotals:
        return JobTotals(
            energy_j=_sum(self.energy_j, other.energy_j),
            cpu_s=self.cpu_s + other.cpu_s,
            work_units=_sum(self.work_units, other.work_units),
            emissions_g=self.emissions_g + other.emissions_g,
            gpu_idle_j=self.gpu_idle_j + other.gpu_idle_j,
        )

    def growth_since(self, baseline: JobTotals) -> JobTotals:
        """What accumulated since ``baseline`` (an earlier value of the same totals); never negative."""
        return JobTotals(
            energy_j=_growth(self.energy_j, baseline.energy_j),
            cpu_s=max(self.cpu_s - baseline.cpu_s, 0.0),
            work_units=_growth(self.work_units, baseline.work_units),
            emissions_g=max(self.emissions_g - baseline.emissions_g, 0.0),
            gpu_idle_j=max(self.gpu_idle_j - baseline.gpu_idle_j, 0.0),
        )

    def at_least(self, floor: JobTotals) -> JobTotals:
        """Every figure no lower than ``floor``'s: a sum rebuilt in another
        order may differ in the last bit, and an exported counter must not dip."""
        return JobTotals(
            energy_j=_highest(self.energy_j, floor.energy_j),
            cpu_s=max(self.cpu_s, floor.cpu_s),
            work_units=_highest(self.work_units, floor.work_units),
            emissions_g=max(self.emissions_g, floor.emissions_g),
            gpu_idle_j=max(self.gpu_idle_j, floor.gpu_idle_j),
        )

    @property
    def total_energy_j(self) -> float:
        return sum(self.energy_j.values())

    @property
    def efficiency(self) -> JobEfficiency:
        return efficiency(self)


def _growth(now: dict[str, float], then: dict[str, float]) -> dict[str, float]:
    return {key: max(value - then.get(key, 0.0), 0.0) for key, value in now.items()}


def _highest(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {key: max(a.get(key, 0.0), b.get(key, 0.0)) for key in a.keys() | b.keys()}


NO_TOTALS = JobTotals()

# Work units the efficiency figures divide by. Generated tokens are what a
# serving engine is paid for; a training job (or any client) reports plain
# ``tokens``, which stand in where no generated tokens were reported.
TOKEN_UNITS = ("tokens_generated", "tokens")
REQUEST_UNIT = "requests"
SAMPLE_UNIT = "samples"


@dataclass(frozen=True, slots=True)
class JobEfficiency:
    """A job's energy and emissions per unit of work, over everything it has done so far.

    Energy is the job's attributed energy over all domains (cpu, dram, gpu),
    without the PUE; emissions include the PUE, as ``JobTotals.emissions_g``
    does. A figure is None where the job reported none of its unit, never
    infinite. ``token_unit`` says which unit counted as tokens.
    """

    energy_per_token_j: float | None = None
    energy_per_request_j: float | None = None
    energy_per_sample_j: float | None = None
    emissions_per_1k_tokens_g: float | None = None
    token_unit: str | None = None


def per_unit(amount: float, units: float) -> float | None:
    """``amount / units``; None where no units were reported, or the quotient would not be finite."""
    if not (math.isfinite(units) and units > 0):
        return None
    quotient = amount / units
    return quotient if math.isfinite(quotient) else None


def token_unit(work_units: Mapping[str, float]) -> str | None:
    """The first of ``TOKEN_UNITS`` the job reported a positive count of."""
    return next((unit for unit in TOKEN_UNITS if work_units.get(unit, 0.0) > 0), None)


def efficiency(totals: JobTotals) -> JobEfficiency:
    """Joules per token, request and sample, and gCO2eq per 1,000 tokens, from one job's totals."""
    work = totals.work_units
    energy_j = totals.total_energy_j
    tokens_unit = token_unit(work)
    tokens = work.get(tokens_unit, 0.0) if tokens_unit else 0.0
    per_token_j = per_unit(energy_j, tokens)
    per_1k_tokens_g = per_unit(totals.emissions_g * 1000.0, tokens)
    return JobEfficiency(
        energy_per_token_j=per_token_j,
        energy_per_request_j=per_unit(energy_j, work.get(REQUEST_UNIT, 0.0)),
        energy_per_sample_j=per_unit(energy_j, work.get(SAMPLE_UNIT, 0.0)),
        emissions_per_1k_tokens_g=per_1k_tokens_g if per_token_j is not None else None,
        # Named only where a per-token figure exists (a count too small to divide by has none).
        token_unit=tokens_unit if per_token_j is not None else None,
    )


@dataclass(frozen=True, slots=True)
class JobView:
    """One job as readers see it: identity, state and totals, immutable.

    The ledger hands these out (``Ledger.job``, ``Ledger.jobs_view``); the
    snapshot, the API and the exporters read them.
    """

    ref: JobRef
    labels: dict[str, str]
    power_w: dict[str, float]  # over the last tick, by domain
    processes: int
    finished_at: float | None
    totals: JobTotals = NO_TOTALS
    first_seen: float = 0.0
    last_seen: float = 0.0

    @property
    def running(self) -> bool:
        return self.finished_at is None

    @property
    def energy_j(self) -> dict[str, float]:
        return self.totals.energy_j

    @property
    def cpu_s(self) -> float:
        return self.totals.cpu_s

    @property
    def work_units(self) -> dict[str, float]:
        return self.totals.work_units

    @property
    def emissions_g(self) -> float:
        return self.totals.emissions_g

    @property
    def gpu_idle_j(self) -> float:
        return self.totals.gpu_idle_j

    @property
    def total_energy_j(self) -> float:
        return self.totals.total_energy_j

    @property
    def total_power_w(self) -> float:
        return sum(self.power_w.values())


# -- validation limits: every stage and edge checks names against these ----
JOB_NAME_MAX_LEN = 128  # a registered job's name, after stripping whitespace
LABELS_MAX = 32
LABEL_KEY_MAX_LEN = 63
LABEL_VALUE_MAX_LEN = 256
WORK_COUNT_MAX = 1e15  # units of work in one report
PIDS_MAX = 64  # root processes in one registration
# Names taken from the cluster (pod annotations and labels, Slurm job names and
# users): Kubernetes' DNS-subdomain length.
EXTERNAL_NAME_MAX_LEN = 253
# Characters refused in names and label values, as a regular-expression class:
# C0, DEL and C1 for what callers send; C0 and DEL for names taken from the
# cluster.
CONTROL_CHAR_CLASS = r"\x00-\x1f\x7f-\x9f"
EXTERNAL_CONTROL_CHAR_CLASS = r"\x00-\x1f\x7f"

# -- GPUs: what the NVML sensor reports about each GPU over one tick, beyond energy --


class GpuSplitMethod(StrEnum):
    """How a GPU's active energy is split among the processes holding it."""

    SM = "sm"  # by share of summed per-process SM utilisation
    MEMORY = "memory"  # by share of GPU memory held: no usable utilisation
    EQUAL = "equal"  # equally: neither utilisation nor memory known
    NONE = "none"  # no process held the GPU


SPLIT_SM, SPLIT_MEMORY, SPLIT_EQUAL = GpuSplitMethod.SM, GpuSplitMethod.MEMORY, GpuSplitMethod.EQUAL


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """One process holding a GPU context during the tick (host pid)."""

    pid: int
    used_memory_bytes: int
    # Mean SM utilisation of the process over the tick's samples, 0..100;
    # None where the driver gives no per-process utilisation (MIG, old drivers).
    sm_utilization_pct: float | None = None
    gpu_instance_id: int | None = None  # MIG GPU instance, where MIG is on


@dataclass(frozen=True, slots=True)
class MigInstanceView:
    """One MIG device of a GPU with MIG on: a GPU instance and its compute instance."""

    uuid: str  # MIG-...
    gpu_instance_id: int
    compute_instance_id: int
    slices: int  # the GPU instance's slices (of 7 on A100 and H100)
    # The instance's own busy ratio where something reports one; None elsewhere.
    utilization_ratio: float | None = None
    # Who reported it: NVML for the MIG device, or dcgm-exporter's
    # DCGM_FI_PROF_GR_ENGINE_ACTIVE for the GPU instance.
    activity_source: Literal["nvml", "dcgm"] | None = None


@dataclass(frozen=True, slots=True)
class GpuDeviceView:
    """Identity, state and processes of one GPU for the last tick."""

    index: int
    device: str  # gpu-<index>: the label energy is reported under
    uuid: str
    name: str
    utilization_ratio: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    power_limit_w: float | None
    mig_enabled: bool
    processes: tuple[GpuProcess, ...] = ()
    # False where the process list could not be read (so nobody is known to
    # hold the GPU, and its energy cannot be split).
    processes_known: bool = True
    pci_bus_id: str = ""  # "00000000:17:00.0"; "" where the driver does not say
    mig_instances: tuple[MigInstanceView, ...] = ()  # where MIG is on

    @property
    def split_method(self) -> GpuSplitMethod:
        return split_method(self.processes)


def split_method(processes: tuple[GpuProcess, ...] | list[GpuProcess]) -> GpuSplitMethod:
    """Which rule splits a GPU's active energy among these processes."""
    if any((p.sm_utilization_pct or 0.0) > 0 for p in processes):
        return SPLIT_SM
    if any(p.used_memory_bytes > 0 for p in processes):
        return SPLIT_MEMORY
    return SPLIT_EQUAL


# -- GPU allocation: which job the scheduler gave which GPU ------------------

# Where an allocation was read: the kubelet's pod-resources API, or the Slurm
# job-mapping directory dcgm-exporter reads.
AllocationSource = Literal["kubelet", "slurm"]


@dataclass(frozen=True, slots=True)
class GpuAllocation:
    """One job's hold on a GPU as the scheduler allocated it.

    ``device_id`` is the scheduler's name for the device: a GPU UUID
    (``GPU-...``), a MIG device UUID (``MIG-...``), either with a time-slicing
    replica suffix (``GPU-...::1``), an NVML index (``0``) or ``<index>.<GPU
    instance>`` (Slurm's mapping directory), or ``gpu-<index>`` (a DRA device
    name). Attribution maps it to a GPU and, for MIG, an instance.
    """

    job: JobRef
    device_id: str
    source: AllocationSource


@dataclass(frozen=True, slots=True)
class AllocationHealth:
    """How fresh one allocation source is."""

    source: AllocationSource
    up: bool  # the last read succeeded
    stale: bool  # the last read failed or is overdue: attribution uses the last known allocation
    errors_total: int
    last_success_unix_s: float  # 0 before the first success
    allocations: int  # allocations known (device, job) pairs
    unmapped: int = 0  # allocations whose pod or device the agent could not name
    allocatable_devices: int = 0  # GPUs the scheduler can allocate on this node, where it says
