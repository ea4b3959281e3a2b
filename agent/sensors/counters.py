"""Cumulative hardware energy counters: wraparound and resets in one place.

RAPL (powercap, µJ, wraps at ``max_energy_range_uj``), hwmon ``energyN_input``
(µJ, no known range) and NVML's total-energy counter (mJ) all go through
``EnergyCounter``; the downtime a restart can recover is judged here too.
"""

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


@dataclass(frozen=True, slots=True)
class CounterStep:
    """What a counter showed since its previous reading."""

    energy_j: float
    reset: bool = False  # it went back by more than a wraparound can explain: nothing counted


@dataclass
class EnergyCounter:
    """One cumulative hardware energy counter.

    ``units_per_j``: 1e6 for µJ counters, 1e3 for mJ. ``max_range``: where the
    counter wraps, 0 when unknown (then a lower reading is a reset, and only
    what was counted since is returned). ``max_power_w``: where given, a
    lower reading that would mean more than twice this power over the
    interval is a reset (a driver reload), not a wraparound, and counts
    nothing rather than inventing a range's worth of energy.
    """

    units_per_j: float = 1e6
    max_range: int = 0
    max_power_w: float | None = None
    last: int | None = None  # the previous raw reading; None before the first or after forget()

    def advance(self, raw: int, interval_s: float = 0.0) -> CounterStep | None:
        """Feed a new raw reading; None for the first one (no baseline yet)."""
        previous, self.last = self.last, raw
        if previous is None:
            return None
        energy_j = counter_delta(previous, raw, self.max_range) / self.units_per_j
        if raw < previous and self.max_power_w is not None and energy_j > self.max_power_w * max(interval_s, 1e-3) * 2:
            return CounterStep(0.0, reset=True)
        return CounterStep(energy_j)

    def forget(self) -> None:
        """Drop the baseline: after a failed read or an outage the counter may
        have been reset, and guessing a wraparound would invent energy."""
        self.last = None


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
