"""Cumulative hardware energy counters: wraparound and resets in one place."""
from __future__ import annotations

from dataclasses import dataclass


def counter_delta(previous: int, current: int, max_range: int) -> int:
    """Units the counter advanced from ``previous`` to ``current``.

    A counter that is lower than before wrapped at ``max_range`` (RAPL's
    ``max_energy_range_uj``); with no known range a lower value is a reset and
    only what was counted since the reset is returned.
    """
    if current >= previous:
        return current - previous
    if max_range > 0 and previous <= max_range:
        return max_range - previous + current
    return current


@dataclass
class EnergyCounter:
    """Tracks one monotonic hardware counter in microjoules."""

    max_range_uj: int = 0
    last_uj: int | None = None

    def advance(self, raw_uj: int) -> float:
        """Feed a new raw reading; return joules since the previous one."""
        previous, self.last_uj = self.last_uj, raw_uj
        if previous is None:
            return 0.0
        return counter_delta(previous, raw_uj, self.max_range_uj) / 1e6


def recoverable_downtime_energy_j(
    saved_uj: int,
    current_uj: int,
    max_range_uj: int,
    elapsed_s: float,
    max_power_w: float,
) -> float:
    """Energy a counter shows was used while the agent was not running.

    Counted only when no wraparound can have hidden part of it: the counter
    did not go backwards, and even at ``max_power_w`` the elapsed time could
    not have carried it through a whole range.
    """
    if elapsed_s < 0 or current_uj < saved_uj:
        return 0.0
    if max_range_uj > 0 and elapsed_s * max_power_w * 1e6 >= max_range_uj:
        return 0.0
    return (current_uj - saved_uj) / 1e6
