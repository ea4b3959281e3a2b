"""Which job the scheduler allocated which GPU: a background poller.

The kubelet's pod-resources API (``podresources.py``) and Slurm's job-mapping
directory (``slurm.read_gpu_job_map``) are read on a thread of their own,
never on the tick path. When a read fails, the last known allocation stays
in force and the poller reports itself stale, so a kubelet restart does not
hand a pod's allocated GPUs back to the node for its duration.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.model import AllocationHealth, AllocationSource, GpuAllocation, JobRef
from agent.workloads.slurm import read_gpu_job_map

log = logging.getLogger(__name__)


class AllocationError(RuntimeError):
    """An allocation source could not be read; the message says why."""


@dataclass(frozen=True, slots=True)
class AllocationRead:
    """One successful read of an allocation source."""

    allocations: tuple[GpuAllocation, ...]
    unmapped: int = 0  # device ids whose pod (or job) could not be named
    allocatable_devices: int = 0


class AllocationPoller:
    """Keeps the last known allocation of one source, refreshed by a daemon thread."""

    def __init__(
        self,
        source: AllocationSource,
        read: Callable[[], AllocationRead],
        poll_s: float,
        timeout_s: float,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self._read = read
        self._monotonic = monotonic
        self._wall = wall
        self._lock = threading.Lock()
        self._last: AllocationRead = AllocationRead(())
        self._up = False
        self._errors = 0
        self._last_error = ""
        self._last_success_wall = 0.0
        self._last_success_mono: float | None = None
        self._stop = threading.Event()
        self.first_poll = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> bool:
        try:
            fresh = self._read()
        except AllocationError as exc:
            with self._lock:
                self._up = False
                self._errors += 1
                if str(exc) != self._last_error:
                    log.warning("GPU allocation (%s): %s; keeping the last known allocation", self.source, exc)
                self._last_error = str(exc)
            return False
        with self._lock:
            self._last = fresh
            self._up = True
            self._last_error = ""
            self._last_success_wall = self._wall()
            self._last_success_mono = self._monotonic()
        return True

    def allocations(self) -> tuple[GpuAllocation, ...]:
        with self._lock:
            return self._last.allocations

    def health(self) -> AllocationHealth:
        with self._lock:
            overdue = (
                self._last_success_mono is None
                or self._monotonic() - self._last_success_mono > 2 * self.poll_s + self.timeout_s
            )
            return AllocationHealth(
                source=self.source,
                up=self._up,
                stale=not self._up or overdue,
                errors_total=self._errors,
                last_success_unix_s=self._last_success_wall,
                allocations=len(self._last.allocations),
                unmapped=self._last.unmapped,
                allocatable_devices=self._last.allocatable_devices,
            )

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self.first_poll.set()
            self._stop.wait(self.poll_s)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"jouleward-gpu-{self.source}", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None


class SlurmMapReader:
    """Reads dcgm-exporter's HPC job-mapping directory (``slurm.read_gpu_job_map``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __call__(self) -> AllocationRead:
        try:
            pairs, skipped = read_gpu_job_map(self.directory)
        except OSError as exc:
            raise AllocationError(f"cannot list {self.directory}: {exc.strerror or exc}") from None
        allocations = tuple(
            GpuAllocation(JobRef(f"slurm-{job_id}", job_id, "slurm"), device_id, "slurm")
            for device_id, job_id in dict.fromkeys(pairs)
        )
        return AllocationRead(allocations, skipped)
