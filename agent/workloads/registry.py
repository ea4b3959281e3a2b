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
    members_version: int = 0  # changes whenever a member process joins or leaves a job
    _joined: dict[ProcessKey, int] = field(default_factory=dict, repr=False)  # key -> epoch it joined at
    # Roots of registrations not yet stored: claimed against other registrations, unseen by the resolver.
    _pending: dict[ProcessKey, str] = field(default_factory=dict, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def register(
        self, name: str, pids: list[int], labels: dict[str, str], owner_uid: int = 0, job_id: str | None = None
    ) -> RegisteredJob:
        """Claim the processes for a new job; raises RegistrationError for a gone
        process, AlreadyRegistered when a process or one of its ancestors already
        belongs to a running job (or to one being registered). The job counts
        only once ``confirm``ed (after it is stored); ``unregister`` drops it."""
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
                    owner = self.keys.get(key) or self._pending.get(key)
                    if owner is not None:
                        raise AlreadyRegistered(chain[0].pid, owner, key.pid)
            for key in job.root_keys:
                self._pending[key] = job.ref.id
        return job

    def confirm(self, job: RegisteredJob) -> None:
        """The registration is stored: from now on its processes are the job's."""
        with self._lock:
            for key in job.root_keys:
                self._pending.pop(key, None)
            self.restore(job)

    def restore(self, job: RegisteredJob, members: tuple[ProcessKey, ...] | None = None) -> None:
        """Add a job as it is: a new registration (its roots), or one resumed
        from the ledger with the member processes still alive."""
        with self._lock:
            self.jobs[job.ref.id] = job
            self.epoch += 1
            if job.finished_at is None:
                for key in job.root_keys if members is None else members:
                    self.keys[key] = job.ref.id
                    self._joined[key] = self.epoch
            self.generation += 1
            self.members_version += 1

    def unregister(self, job_id: str) -> None:
        """Undo a registration that could not be stored: as if it never happened."""
        with self._lock:
            self.jobs.pop(job_id, None)
            for key in [k for k, owner in self._pending.items() if owner == job_id]:
                del self._pending[key]
            for key in [k for k, owner in self.keys.items() if owner == job_id]:
                del self.keys[key]
                self._joined.pop(key, None)
            self.generation += 1
            self.members_version += 1

    def members(self) -> dict[str, tuple[ProcessKey, ...]]:
        """Every running job's member processes (roots and adopted descendants)."""
        with self._lock:
            result: dict[str, list[ProcessKey]] = {}
            for key, job_id in self.keys.items():
                result.setdefault(job_id, []).append(key)
            return {job_id: tuple(sorted(keys)) for job_id, keys in result.items()}

    def keys_joined_by(self, epoch: int) -> list[ProcessKey]:
        """Member processes that had joined their job by ``epoch``."""
        with self._lock:
            return [key for key in self.keys if self._joined.get(key, 0) <= epoch]

    def finish(self, job_id: str, reason: str = "finished", at: RegisteredJob | None = None) -> RegisteredJob:
        """Finish a job (``at``: the finished registration already stored)."""
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None:
                raise UnknownJob(job_id)
            if job.finished_at is None:
                job = at or replace(job, finished_at=time.time(), finish_reason=reason)
                self.jobs[job_id] = job
                self.members_version += 1
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
                if self.keys.get(key) != job_id:
                    self.members_version += 1
                self.keys[key] = job_id
                self._joined.setdefault(key, self.epoch)

    def forget_exited(self, exited: list[ProcessKey]) -> list[str]:
        """Drop exited processes; finish jobs left with none. Returns those job ids."""
        emptied = []
        with self._lock:
            touched = {self.keys.pop(key) for key in exited if key in self.keys}
            if touched:
                self.members_version += 1
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
