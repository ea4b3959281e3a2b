"""Splitting measured energy into idle, host (unattributed) and per-job parts.

Pure arithmetic: no I/O, no clock. The method (docs/architecture.md):

* Static (idle) power is what the domain draws doing nothing. It comes from the
  configuration, from the source itself (a power model knows it), or from
  ``IdlePowerEstimator``, a fit of power against utilisation. Idle energy for a
  tick is ``min(measured, idle_power * interval)``; it does not shrink as load
  rises (the "energy times usage ratio" method does, and then reports near-zero
  idle on a busy node).
* The rest is active energy, shared by CPU time in the interval. The
  denominator is the node's busy CPU time (from /proc/stat), so CPU time the
  kernel spends outside any process, and processes that exited between scans,
  stay unattributed rather than inflating the jobs. DRAM is split by CPU time
  too: DRAM's active energy comes from memory traffic, which happens while a
  process runs; resident memory measures occupancy, whose refresh cost is part
  of the static power.

Invariant: idle + unattributed + sum(jobs) == measured, nothing negative or NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.model import DomainAttribution


def _finite_non_negative(value: float) -> float:
    return value if math.isfinite(value) and value > 0 else 0.0


def split_domain(
    domain: str,
    measured_j: float,
    idle_power_w: float,
    interval_s: float,
    job_cpu_s: Mapping[str, float],
    node_busy_cpu_s: float,
) -> DomainAttribution:
    """Split one domain's energy for one tick."""
    measured = _finite_non_negative(measured_j)
    idle = min(measured, _finite_non_negative(idle_power_w) * _finite_non_negative(interval_s))
    active = measured - idle
    cpu = {job: _finite_non_negative(seconds) for job, seconds in job_cpu_s.items()}
    denominator = max(_finite_non_negative(node_busy_cpu_s), math.fsum(cpu.values()))
    jobs: dict[str, float] = {}
    if active > 0 and denominator > 0:
        for job, seconds in cpu.items():
            if seconds > 0:
                jobs[job] = active * (seconds / denominator)
    attributed = math.fsum(jobs.values())
    if attributed > active:  # rounding only: rescale so the parts never exceed the whole
        scale = active / attributed
        jobs = {job: energy * scale for job, energy in jobs.items()}
        attributed = math.fsum(jobs.values())
    unattributed = max(active - attributed, 0.0)
    return DomainAttribution(domain, measured, idle, unattributed, jobs)


def jobs_energy_j(parts: list[DomainAttribution]) -> dict[str, float]:
    """Each job's energy over every domain of one tick."""
    totals: dict[str, float] = {}
    for part in parts:
        for job, energy in part.jobs_j.items():
            totals[job] = totals.get(job, 0.0) + energy
    return totals


def conservation_error_j(part: DomainAttribution) -> float:
    return abs(part.idle_j + part.unattributed_j + math.fsum(part.jobs_j.values()) - part.measured_j)


def linear_model_idle_w(power_w: float, utilization: float, idle_fraction: float) -> float:
    """Idle power implied by one (utilisation, power) point if the device follows
    ``P(u) = max * (f + (1 - f) * u)`` with idle fraction ``f``."""
    u = min(max(utilization, 0.0), 1.0)
    denominator = idle_fraction + (1.0 - idle_fraction) * u
    return power_w * idle_fraction / denominator if denominator > 0 else 0.0  # f = 0 at rest: no idle power


@dataclass
class _Bin:
    count: int = 0
    mean_utilization: float = 0.0
    mean_power_w: float = 0.0

    def add(self, utilization: float, power_w: float, max_weight: int) -> None:
        # A running mean that turns into an exponential one once it has
        # max_weight points, so old operating conditions fade out.
        self.count += 1
        weight = 1.0 / min(self.count, max_weight)
        self.mean_utilization += (utilization - self.mean_utilization) * weight
        self.mean_power_w += (power_w - self.mean_power_w) * weight


@dataclass
class IdlePowerEstimator:
    """Estimates a device's static power from (utilisation, power) observations.

    Observations go into utilisation bins; with enough spread between bins, a
    weighted least-squares line through the bin means gives the intercept at
    zero utilisation, clamped to [0, lowest bin's mean power]. Before that, the
    lowest-utilisation bin and the linear model's shape give a prior.
    """

    bins: int = 20
    min_points_per_bin: int = 3
    min_spread: float = 0.1
    max_weight: int = 200
    prior_idle_fraction: float = 0.12
    _bins: dict[int, _Bin] = field(default_factory=dict)

    def observe(self, utilization: float, power_w: float) -> None:
        if not (math.isfinite(utilization) and math.isfinite(power_w)) or power_w < 0:
            return
        u = min(max(utilization, 0.0), 1.0)
        index = min(int(u * self.bins), self.bins - 1)
        self._bins.setdefault(index, _Bin()).add(u, power_w, self.max_weight)

    def estimate_w(self) -> float | None:
        ready = [b for b in self._bins.values() if b.count >= self.min_points_per_bin]
        if not ready:
            ready = list(self._bins.values())
            if not ready:
                return None
        lowest = min(ready, key=lambda b: b.mean_utilization)
        ceiling = min(b.mean_power_w for b in ready)
        spread = max(b.mean_utilization for b in ready) - lowest.mean_utilization
        if len(ready) >= 2 and spread >= self.min_spread:
            weights = [min(b.count, self.max_weight) for b in ready]
            total = sum(weights)
            mean_u = sum(w * b.mean_utilization for w, b in zip(weights, ready)) / total
            mean_p = sum(w * b.mean_power_w for w, b in zip(weights, ready)) / total
            var_u = sum(w * (b.mean_utilization - mean_u) ** 2 for w, b in zip(weights, ready))
            cov = sum(w * (b.mean_utilization - mean_u) * (b.mean_power_w - mean_p) for w, b in zip(weights, ready))
            if var_u > 0:
                intercept = mean_p - (cov / var_u) * mean_u
                return min(max(intercept, 0.0), ceiling)
        return min(linear_model_idle_w(lowest.mean_power_w, lowest.mean_utilization, self.prior_idle_fraction), ceiling)
