"""Small frozen dataclasses at the seams between pipeline stages.

Units live in field names: ``energy_j`` joules, ``power_w`` watts, ``cpu_s``
CPU-seconds, ``interval_s`` seconds of the monotonic clock.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

# Domains whose energy is attributed to jobs. Other domains (``platform`` from
# RAPL psys, ``board`` from hwmon) are exported per node only: they overlap the
# attributed ones, so attributing them too would count energy twice.
ATTRIBUTED_DOMAINS = ("cpu", "dram", "gpu")


@dataclass(frozen=True, slots=True)
class DeviceEnergy:
    """Energy one device used during one tick."""

    domain: str  # cpu, dram, gpu, platform, board
    device: str  # package-0, dram-0, gpu-0, ...
    source: str  # rapl, hwmon, model, nvml_energy, nvml_power
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
    kind: str  # registered, pod, slurm, systemd, env, rule
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
