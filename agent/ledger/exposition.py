"""Which jobs get series of their own, and what the overflow aggregate holds.

Admission is first come, first served, and sticky: once a job has series of
its own, or has gone to the overflow aggregate (``_other``), it stays there
while it is in the ledger's memory. The ledger owns one ``Exposition`` and
stores it with the totals in the same transaction, so a restart rebuilds
exactly the same split.

The aggregate counts each overflow job's growth since it joined the
overflow (its baseline), so a job that had series of its own, left memory
and comes back into the overflow is not counted a second time:

    aggregate = retired + sum over overflow members of (totals - baseline)

where ``retired`` keeps what members that left memory had added. The
aggregate handed out never falls below the last one handed out (``floor``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from agent.model import NO_TOTALS, JobRef, JobTotals, JobView

OVERFLOW_JOB = JobRef("_other", "_other", "overflow")


class ExposureState(StrEnum):
    EXPORTED = "exported"  # series of its own
    OVERFLOW = "overflow"  # summed into the overflow aggregate


@dataclass
class Exposition:
    cap: int
    exported: set[str] = field(default_factory=set)
    overflow: dict[str, JobTotals] = field(default_factory=dict)  # member -> its totals when it joined
    retired: JobTotals = NO_TOTALS
    floor: JobTotals = NO_TOTALS
    # Job ids whose state changed since the last commit (None: deleted).
    pending: dict[str, ExposureState | None] = field(default_factory=dict)
    aggregate_changed: bool = False

    def state(self, job_id: str) -> ExposureState | None:
        if job_id in self.exported:
            return ExposureState.EXPORTED
        if job_id in self.overflow:
            return ExposureState.OVERFLOW
        return None

    def admit(self, job_id: str, totals_now: JobTotals) -> None:
        """Give a job in memory its place, if it has none yet."""
        if job_id in self.exported or job_id in self.overflow:
            return
        if len(self.exported) < self.cap:
            self.exported.add(job_id)
            self.pending[job_id] = ExposureState.EXPORTED
        else:
            self.overflow[job_id] = totals_now
            self.pending[job_id] = ExposureState.OVERFLOW

    def restore(self, job_id: str, state: ExposureState, baseline: JobTotals) -> None:
        """Put back a job's place as the ledger stored it."""
        if state is ExposureState.EXPORTED:
            self.exported.add(job_id)
        else:
            self.overflow[job_id] = baseline

    def retire(self, job_id: str, totals_final: JobTotals) -> None:
        """A job leaves memory: an overflow member's growth stays in the aggregate."""
        if job_id in self.exported:
            self.exported.discard(job_id)
            self.pending[job_id] = None
        baseline = self.overflow.pop(job_id, None)
        if baseline is not None:
            self.retired = self.retired + totals_final.growth_since(baseline)
            self.aggregate_changed = True
            self.pending[job_id] = None

    def select(self, jobs: Iterable[JobView]) -> tuple[tuple[JobView, ...], JobTotals]:
        """The exported jobs' views, then the overflow aggregate if there is one;
        and the aggregate's totals, to become ``floor`` once stored."""
        exported: list[JobView] = []
        aggregate = self.retired
        power: dict[str, float] = {}
        processes = 0
        overflow = self.overflow
        for job in jobs:
            job_id = job.ref.id
            if job_id in self.exported:
                exported.append(job)
                continue
            baseline = overflow.get(job_id)
            if baseline is None:
                continue
            aggregate = aggregate + (job.totals if baseline is NO_TOTALS else job.totals.growth_since(baseline))
            for domain, watts in job.power_w.items():
                power[domain] = power.get(domain, 0.0) + watts
            processes += job.processes
        if not (overflow or self.retired.energy_j or self.floor.energy_j):
            return tuple(exported), self.floor
        aggregate = aggregate.at_least(self.floor)
        exported.append(JobView(OVERFLOW_JOB, {}, power, processes, None, aggregate))
        return tuple(exported), aggregate
