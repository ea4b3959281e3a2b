"""Jobs registered through the control API: a set of process trees."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent.model import JobRef, ProcessKey
from agent.workloads.procfs import parse_stat


class RegistrationError(ValueError):
    """The request cannot be honoured; the message says why."""


class UnknownJob(KeyError):
    pass


class AlreadyRegistered(RegistrationError):
    """A process (or an ancestor of it) already belongs to a running registered job."""

    def __init__(self, pid: int, job_id: str, via_pid: int) -> None:
        through = "" if via_pid == pid else f" through its ancestor {via_pid}"
        super().__init__(f"pid {pid} already belongs to registered job {job_id!r}{through}")
        self.job_id = job_id


@dataclass(frozen=True)
class RegisteredJob:
    ref: JobRef
    labels: dict[str, str]
    root_keys: tuple[ProcessKey, ...]
    owner_uid: int
    registered_at: float  # Unix time
    finished_at: float | None = None
    finish_reason: str = ""


def read_process_key(procfs: Path, pid: int) -> ProcessKey | None:
    try:
        with open(procfs / str(pid) / "stat", "rb") as handle:
            parsed = parse_stat(handle.read())
    except (OSError, ValueError):
        return None
    return ProcessKey(pid, parsed[3]) if parsed else None


def _ancestry(procfs: Path, pid: int, limit: int = 4096) -> list[ProcessKey]:
    """The process and its ancestors, nearest first (a parent starts before its child)."""
    chain: list[ProcessKey] = []
    while pid > 0 and len(chain) < limit:
        try:
            with open(procfs / str(pid) / "stat", "rb") as handle:
                parsed = parse_stat(handle.read())
        except (OSError, ValueError):
            break
        if parsed is None:
            break
        key = ProcessKey(pid, parsed[3])
        if chain and key.start_ticks > chain[-1].start_ticks:
            break  # a reused pid, not the parent
        chain.append(key)
        pid = parsed[1]
    return chain


def new_job_id() -> str:
    return "r-" + secrets.token_hex(6)


@dataclass
class Registry:
    """Thread-safe: the API registers and finishes, the sampler resolves.

    ``keys`` maps every process known to belong to a registered job (the
    registered roots and every descendant seen since) to its job id.
    ``generation`` changes whenever the set of roots changes, telling the
    resolver to look at already-known processes again. ``epoch`` counts
    registrations; each key remembers the epoch it joined at, so that a tick
    judges only keys that were registered before it scanned.
    """

    procfs: Path
    jobs: dict[str, RegisteredJob] = field(default_factory=dict)
    keys: dict[ProcessKey, str] = field(default_factory=dict)
    generation: int = 0
    epoch: int = 0
    _joined: dict[ProcessKey, int] = field(default_factory=dict, repr=False)  # key -> epoch it joined at
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def register(
        self, name: str, pids: list[int], labels: dict[str, str], owner_uid: int = 0, job_id: str | None = None
    ) -> RegisteredJob:
        """Raises RegistrationError for a gone process, AlreadyRegistered when a
        process or one of its ancestors already belongs to a running job."""
        chains = []
        for pid in pids:
            chain = _ancestry(self.procfs, pid)
            if not chain:
                raise RegistrationError(f"no such process: {pid}")
            chains.append(chain)
        job = RegisteredJob(
            ref=JobRef(job_id or new_job_id(), name, "registered"),
            labels=dict(labels),
            root_keys=tuple(chain[0] for chain in chains),
            owner_uid=owner_uid,
            registered_at=time.time(),
        )
        with self._lock:  # checked and added at once: two callers cannot both claim a process
            for chain in chains:
                for key in chain:
                    owner = self.keys.get(key)
                    if owner is not None:
                        raise AlreadyRegistered(chain[0].pid, owner, key.pid)
            self.restore(job)
        return job

    def restore(self, job: RegisteredJob) -> None:
        """Add a job as it is (a new registration, or one resumed from the ledger)."""
        with self._lock:
            self.jobs[job.ref.id] = job
            self.epoch += 1
            if job.finished_at is None:
                for key in job.root_keys:
                    self.keys[key] = job.ref.id
                    self._joined[key] = self.epoch
            self.generation += 1

    def keys_joined_by(self, epoch: int) -> list[ProcessKey]:
        """Member processes that had joined their job by ``epoch``."""
        with self._lock:
            return [key for key in self.keys if self._joined.get(key, 0) <= epoch]

    def finish(self, job_id: str, reason: str = "finished") -> RegisteredJob:
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None:
                raise UnknownJob(job_id)
            if job.finished_at is None:
                job = replace(job, finished_at=time.time(), finish_reason=reason)
                self.jobs[job_id] = job
                for key in [k for k, owner in self.keys.items() if owner == job_id]:
                    del self.keys[key]
                    self._joined.pop(key, None)
                self.generation += 1
            return job

    def get(self, job_id: str) -> RegisteredJob | None:
        with self._lock:
            return self.jobs.get(job_id)

    def job_of(self, key: ProcessKey) -> str | None:
        return self.keys.get(key)

    def adopt(self, key: ProcessKey, job_id: str) -> None:
        """A descendant of a registered process joins its job."""
        with self._lock:
            if job_id in self.jobs and self.jobs[job_id].finished_at is None:
                self.keys[key] = job_id
                self._joined.setdefault(key, self.epoch)

    def forget_exited(self, exited: list[ProcessKey]) -> list[str]:
        """Drop exited processes; finish jobs left with none. Returns those job ids."""
        emptied = []
        with self._lock:
            touched = {self.keys.pop(key) for key in exited if key in self.keys}
            for key in exited:
                self._joined.pop(key, None)
            live = set(self.keys.values())
            for job_id in touched - live:
                emptied.append(job_id)
        for job_id in emptied:
            self.finish(job_id, reason="exited")
        return emptied

    def drop(self, job_id: str) -> None:
        with self._lock:
            self.jobs.pop(job_id, None)
