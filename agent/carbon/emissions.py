"""Energy to emissions: grams of CO2-equivalent, charged tick by tick.

Each tick's energy is charged at the intensity in force during that tick, so
a job that ran through a clean night and a dirty evening pays for each at its
own rate rather than at an average applied at the end.
"""

from __future__ import annotations

from collections.abc import Mapping

J_PER_KWH = 3.6e6


def grams(energy_j: float, grams_per_kwh: float, pue: float = 1.0) -> float:
    """gCO2eq for ``energy_j`` of IT energy; PUE adds the data centre's overhead."""
    if energy_j <= 0.0 or grams_per_kwh <= 0.0:
        return 0.0
    return energy_j / J_PER_KWH * grams_per_kwh * pue


def tick_grams(jobs_j: Mapping[str, float], grams_per_kwh: float, pue: float = 1.0) -> dict[str, float]:
    """Per-job gCO2eq for one tick, from each job's energy over all domains in that tick."""
    return {job_id: grams(energy_j, grams_per_kwh, pue) for job_id, energy_j in jobs_j.items()}


def interval_midpoint_s(end_unix_s: float, interval_s: float) -> float:
    """The instant whose intensity stands for the tick that ended at ``end_unix_s``."""
    return end_unix_s - interval_s / 2.0
