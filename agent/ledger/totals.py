"""Cumulative energy per node, domain and job: in memory, durable in SQLite.

Readers and writers go through ``Ledger``'s methods, never its fields or its
lock. Writing: ``book_tick`` (one tick's split), ``book_emissions``,
``book_recovered`` (energy used while the agent was down), ``ensure_job`` /
``update_identity``, ``add_work``, ``mark_finished``, ``save_registration``,
``evict_finished``, ``flush``. Reading: ``read`` (everything a snapshot
needs, copied under the lock), ``job``, ``all_jobs``, ``jobs``, ``has_job``,
``finished_before``, ``registered_jobs``, ``saved_counters``. Jobs come out
as immutable ``JobView``s carrying one ``JobTotals``.

The in-memory totals are authoritative while the agent runs; ``flush`` writes
the rows that changed since the last flush in one transaction (WAL journal),
so a crash loses at most one flush interval and never leaves a half-written
total. On start the totals are loaded back and counters resume.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

from agent.errors import JoulewardError
from agent.model import NO_TOTALS, DeviceEnergy, DeviceView, DomainAttribution, JobRef, JobTotals, JobView, ProcessKey
from agent.workloads.registry import RegisteredJob

SCHEMA = """
CREATE TABLE IF NOT EXISTS node_energy (
    domain TEXT NOT NULL, device TEXT NOT NULL, source TEXT NOT NULL,
    energy_j REAL NOT NULL, PRIMARY KEY (domain, device, source));
CREATE TABLE IF NOT EXISTS domain_totals (
    domain TEXT PRIMARY KEY, idle_j REAL NOT NULL, unattributed_j REAL NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL, namespace TEXT NOT NULL,
    labels TEXT NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    finished_at REAL, cpu_s REAL NOT NULL, registration TEXT);
CREATE TABLE IF NOT EXISTS job_energy (
    job_id TEXT NOT NULL, domain TEXT NOT NULL, energy_j REAL NOT NULL,
    PRIMARY KEY (job_id, domain));
CREATE TABLE IF NOT EXISTS job_work (
    job_id TEXT NOT NULL, unit TEXT NOT NULL, count REAL NOT NULL,
    PRIMARY KEY (job_id, unit));
CREATE TABLE IF NOT EXISTS counters (
    zone_id TEXT PRIMARY KEY, raw_uj INTEGER NOT NULL, max_range_uj INTEGER NOT NULL,
    boot_id TEXT NOT NULL, monotonic_s REAL NOT NULL);
CREATE TABLE IF NOT EXISTS job_emissions (job_id TEXT PRIMARY KEY, emissions_g REAL NOT NULL);
CREATE TABLE IF NOT EXISTS node_emissions (id INTEGER PRIMARY KEY CHECK (id = 0), emissions_g REAL NOT NULL);
"""


# job_energy row that holds a job's allocated-but-idle GPU energy.
GPU_IDLE_ROW = "gpu_idle"


class LedgerError(JoulewardError, RuntimeError):
    """The ledger's SQLite file cannot be opened."""


@dataclass(eq=False)
class JobRecord:
    """The ledger's own, mutable state of one job; readers get ``view()``."""

    ref: JobRef
    labels: dict[str, str]  # replaced, never mutated: views share it
    first_seen: float
    last_seen: float
    finished_at: float | None = None
    totals: JobTotals = NO_TOTALS
    power_w: dict[str, float] = field(default_factory=dict)  # replaced, never mutated
    processes: int = 0
    registration: RegisteredJob | None = None
    _view: JobView | None = None  # the last view handed out, while nothing changed

    def view(self) -> JobView:
        view = self._view
        if view is None:
            view = self._view = JobView(
                self.ref,
                self.labels,
                self.power_w,
                self.processes,
                self.finished_at,
                self.totals,
                self.first_seen,
                self.last_seen,
            )
        return view


@dataclass(frozen=True, slots=True)
class LedgerReading:
    """What a snapshot needs of the ledger, copied in one go."""

    devices: tuple[DeviceView, ...]  # sorted by (domain, device, source)
    idle_j: dict[str, float]
    unattributed_j: dict[str, float]
    node_emissions_g: float
    jobs: tuple[JobView, ...]  # every job in memory, in admission order
    last_flush_unix: float | None
    flush_errors: int


@dataclass(frozen=True, slots=True)
class JobActivity:
    """What the process scan saw of one job during a tick."""

    ref: JobRef
    cpu_s: float
    processes: int


@dataclass(frozen=True, slots=True)
class SavedCounter:
    raw_uj: int
    max_range_uj: int
    boot_id: str
    monotonic_s: float


def _fresh(record: JobRecord) -> JobView:
    """A view with the current last_seen: the cached one skips that field,
    which changes on every tick a job is seen, so snapshots can reuse views."""
    view = record.view()
    return view if view.last_seen == record.last_seen else replace(view, last_seen=record.last_seen)


def _registration_to_json(job: RegisteredJob) -> str:
    return json.dumps(
        {
            "roots": [[k.pid, k.start_ticks] for k in job.root_keys],
            "owner_uid": job.owner_uid,
            "registered_at": job.registered_at,
            "finish_reason": job.finish_reason,
        }
    )


def _registration_from_row(row: sqlite3.Row) -> RegisteredJob:
    data = json.loads(row["registration"])
    return RegisteredJob(
        ref=JobRef(row["id"], row["name"], row["kind"], row["namespace"]),
        labels=json.loads(row["labels"]),
        root_keys=tuple(ProcessKey(pid, start) for pid, start in data["roots"]),
        owner_uid=data["owner_uid"],
        registered_at=data["registered_at"],
        finished_at=row["finished_at"],
        finish_reason=data.get("finish_reason", ""),
    )


class Ledger:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "ledger.sqlite3"
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5.0)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise LedgerError(f"cannot open the ledger in {state_dir}: {exc}") from None
        self._lock = threading.RLock()
        self._node_energy_j: dict[tuple[str, str, str], float] = {}
        self._node_power_w: dict[tuple[str, str, str], float] = {}
        self._idle_j: dict[str, float] = {}
        self._unattributed_j: dict[str, float] = {}
        self._jobs: dict[str, JobRecord] = {}
        self.node_emissions_g = 0.0
        self._dirty_jobs: set[str] = set()  # to write at the next flush
        self.last_flush_unix: float | None = None
        self.flush_errors = 0
        self.last_flush_error = ""
        self._load()

    # -- loading -------------------------------------------------------------
    def _load(self) -> None:
        db = self._db
        for row in db.execute("SELECT domain, device, source, energy_j FROM node_energy"):
            self._node_energy_j[(row["domain"], row["device"], row["source"])] = row["energy_j"]
        for row in db.execute("SELECT domain, idle_j, unattributed_j FROM domain_totals"):
            self._idle_j[row["domain"]] = row["idle_j"]
            self._unattributed_j[row["domain"]] = row["unattributed_j"]
        energy: dict[str, dict[str, float]] = {}
        for row in db.execute("SELECT job_id, domain, energy_j FROM job_energy"):
            energy.setdefault(row["job_id"], {})[row["domain"]] = row["energy_j"]
        # Finished jobs stay in SQLite; only running ones come back into memory.
        for row in db.execute("SELECT * FROM jobs WHERE finished_at IS NULL"):
            self._jobs[row["id"]] = self._record_from_row(
                row, energy.get(row["id"], {}), self._work_of(row["id"]), self._saved_emissions_g(row["id"])
            )
        for row in db.execute("SELECT emissions_g FROM node_emissions"):
            self.node_emissions_g = row["emissions_g"]

    def _saved_emissions_g(self, job_id: str) -> float:
        row = self._db.execute("SELECT emissions_g FROM job_emissions WHERE job_id = ?", (job_id,)).fetchone()
        return row["emissions_g"] if row else 0.0

    def _work_of(self, job_id: str) -> dict[str, float]:
        return {
            r["unit"]: r["count"]
            for r in self._db.execute("SELECT unit, count FROM job_work WHERE job_id = ?", (job_id,))
        }

    @staticmethod
    def _record_from_row(
        row: sqlite3.Row, energy: dict[str, float], work: dict[str, float], emissions_g: float
    ) -> JobRecord:
        energy = dict(energy)
        gpu_idle_j = energy.pop(GPU_IDLE_ROW, 0.0)
        return JobRecord(
            ref=JobRef(row["id"], row["name"], row["kind"], row["namespace"]),
            labels=json.loads(row["labels"]),
            first_seen=row["first_seen"],
            last_seen=row["last_seen"],
            finished_at=row["finished_at"],
            totals=JobTotals(
                energy_j=energy,
                cpu_s=row["cpu_s"],
                work_units=dict(work),
                emissions_g=emissions_g,
                gpu_idle_j=gpu_idle_j,
            ),
            registration=_registration_from_row(row) if row["registration"] else None,
        )

    def saved_counters(self) -> dict[str, SavedCounter]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM counters").fetchall()
        return {
            r["zone_id"]: SavedCounter(r["raw_uj"], r["max_range_uj"], r["boot_id"], r["monotonic_s"]) for r in rows
        }

    def registered_jobs(self) -> list[RegisteredJob]:
        """Registered jobs that had not finished when the agent last stopped."""
        return [r.registration for r in self._jobs.values() if r.registration and r.finished_at is None]

    def _changed(self, job_id: str) -> None:
        self._dirty_jobs.add(job_id)
        record = self._jobs.get(job_id)
        if record is not None:
            record._view = None

    # -- booking -------------------------------------------------------------
    def book_tick(
        self,
        now_unix: float,
        devices: list[DeviceEnergy],
        parts: list[DomainAttribution],
        activity: dict[str, JobActivity],
        interval_s: float,
        gpu_idle_j: dict[str, float] | None = None,
    ) -> None:
        with self._lock:
            jobs = self._jobs
            # Each job's growth this tick, added to its totals once.
            job_energy: dict[str, dict[str, float]] = {}
            idle_gpu: dict[str, float] = {}
            for job_id, energy_j in (gpu_idle_j or {}).items():
                if job_id in jobs:
                    idle_gpu[job_id] = idle_gpu.get(job_id, 0.0) + energy_j
            self._node_power_w = {}
            for reading in devices:
                key = (reading.domain, reading.device, reading.source)
                self._node_energy_j[key] = self._node_energy_j.get(key, 0.0) + reading.energy_j
                self._node_power_w[key] = reading.power_w
            job_power: dict[str, dict[str, float]] = {}
            for part in parts:
                self._idle_j[part.domain] = self._idle_j.get(part.domain, 0.0) + part.idle_j
                self._unattributed_j[part.domain] = self._unattributed_j.get(part.domain, 0.0) + part.unattributed_j
                for job_id, energy_j in part.jobs_j.items():
                    if job_id not in jobs:
                        continue
                    grown = job_energy.setdefault(job_id, {})
                    grown[part.domain] = grown.get(part.domain, 0.0) + energy_j
                    job_power.setdefault(job_id, {})[part.domain] = energy_j / interval_s if interval_s > 0 else 0.0
            no_power: dict[str, float] = {}
            for job_id, record in jobs.items():
                seen = activity.get(job_id)
                cpu_s = seen.cpu_s if seen is not None else 0.0
                energy = job_energy.get(job_id)
                idle = idle_gpu.get(job_id)
                if energy is not None or idle is not None or cpu_s:
                    record.totals = record.totals + JobTotals(
                        energy_j=energy or {}, cpu_s=cpu_s, gpu_idle_j=idle or 0.0
                    )
                    record._view = None
                power = job_power.get(job_id, no_power)
                if power != record.power_w:
                    record.power_w = power
                    record._view = None
                if seen is not None:
                    if seen.processes != record.processes or record.finished_at is not None:
                        record._view = None
                    record.processes = seen.processes
                    record.last_seen = now_unix
                    if record.registration is None:
                        record.finished_at = None  # a pod or unit seen again is running again
                    self._dirty_jobs.add(job_id)
                elif record.finished_at is None and record.registration is None:
                    record.processes = 0
                    record.finished_at = now_unix
                    self._changed(job_id)
                elif record.processes:
                    record.processes = 0
                    record._view = None

    def book_emissions(self, jobs_g: dict[str, float], node_g: float) -> None:
        """Add one tick's emissions to the jobs and the node (grams, never negative)."""
        with self._lock:
            if node_g > 0 and math.isfinite(node_g):
                self.node_emissions_g += node_g
            for job_id, grams in jobs_g.items():
                record = self._jobs.get(job_id)
                if record is not None and grams > 0 and math.isfinite(grams):
                    record.totals = record.totals + JobTotals(emissions_g=grams)
                    self._changed(job_id)

    def ensure_job(
        self,
        ref: JobRef,
        now_unix: float,
        labels: dict[str, str] | None = None,
        registration: RegisteredJob | None = None,
    ) -> JobView:
        """A job, created (or brought back from SQLite) if needed; its name,
        labels and registration updated where given."""
        with self._lock:
            record = self._jobs.get(ref.id)
            if record is None:
                record = self._load_job(ref.id) or JobRecord(ref, dict(labels or {}), now_unix, now_unix)
                self._jobs[ref.id] = record
            elif record.ref != ref:
                record.ref = ref  # a name learnt later (a Slurm job's, from its environment)
            if registration is not None:
                record.registration = registration
                record.labels = dict(registration.labels)
                record.finished_at = registration.finished_at
            elif labels is not None:
                record.labels = dict(labels)
            self._changed(ref.id)
            return record.view()

    def has_job(self, job_id: str) -> bool:
        """Whether the job is in memory (running, or finished and retained)."""
        return job_id in self._jobs

    def update_identity(self, ref: JobRef, now_unix: float, labels: dict[str, str] | None = None) -> None:
        """Take a name learnt later (a Slurm job's) or new info labels, where they differ."""
        record = self._jobs.get(ref.id)
        if record is None or record.ref != ref or (labels is not None and record.labels != labels):
            self.ensure_job(ref, now_unix, labels=labels)

    def _load_job(self, job_id: str) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        energy = {
            r["domain"]: r["energy_j"]
            for r in self._db.execute("SELECT domain, energy_j FROM job_energy WHERE job_id = ?", (job_id,))
        }
        return self._record_from_row(row, energy, self._work_of(job_id), self._saved_emissions_g(job_id))

    def add_work(self, job_id: str, unit: str, count: float) -> JobView | None:
        """Add reported units of work (samples, tokens, ...); durable with the next flush."""
        with self._lock:
            record = self._jobs.get(job_id)
            if record is None:
                return None
            record.totals = record.totals + JobTotals(work_units={unit: count})
            self._changed(job_id)
            return _fresh(record)

    def book_recovered(self, domain: str, device: str, source: str, energy_j: float) -> None:
        """Energy a device's counter shows was used while the agent was down:
        the node's total grows, and nobody's job is charged for it."""
        if energy_j > 0 and math.isfinite(energy_j):
            with self._lock:
                key = (domain, device, source)
                self._node_energy_j[key] = self._node_energy_j.get(key, 0.0) + energy_j
                self._unattributed_j[domain] = self._unattributed_j.get(domain, 0.0) + energy_j

    def mark_finished(self, job_id: str, registration: RegisteredJob) -> None:
        with self._lock:
            record = self._jobs.get(job_id)
            if record is not None:
                record.registration = registration
                record.finished_at = registration.finished_at
                self._changed(job_id)

    def finished_before(self, older_than_unix: float) -> list[JobView]:
        """Jobs in memory that finished before the given time."""
        with self._lock:
            return [
                r.view() for r in self._jobs.values() if r.finished_at is not None and r.finished_at < older_than_unix
            ]

    def evict_finished(self, older_than_unix: float) -> list[str]:
        """Drop finished jobs from memory (they stay in SQLite). Flush first."""
        with self._lock:
            gone = [
                job_id
                for job_id, r in self._jobs.items()
                if r.finished_at is not None and r.finished_at < older_than_unix and job_id not in self._dirty_jobs
            ]
            for job_id in gone:
                del self._jobs[job_id]
            return gone

    # -- persistence ---------------------------------------------------------
    def save_registration(self, job: RegisteredJob, now_unix: float) -> None:
        """Write a registration through at once: it must survive a crash."""
        with self._lock:
            self.ensure_job(job.ref, now_unix, registration=job)
            self._write_job(self._jobs[job.ref.id])

    def _write_job(self, record: JobRecord) -> None:
        ref, totals = record.ref, record.totals
        self._db.execute(
            "INSERT INTO jobs (id, name, kind, namespace, labels, first_seen, last_seen, finished_at, cpu_s, "
            "registration) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET name=excluded.name, "
            "kind=excluded.kind, namespace=excluded.namespace, labels=excluded.labels, "
            "last_seen=excluded.last_seen, finished_at=excluded.finished_at, cpu_s=excluded.cpu_s, "
            "registration=excluded.registration",
            (
                ref.id,
                ref.name,
                ref.kind,
                ref.namespace,
                json.dumps(record.labels),
                record.first_seen,
                record.last_seen,
                record.finished_at,
                totals.cpu_s,
                _registration_to_json(record.registration) if record.registration else None,
            ),
        )
        self._db.executemany(
            "INSERT INTO job_energy (job_id, domain, energy_j) VALUES (?,?,?) "
            "ON CONFLICT(job_id, domain) DO UPDATE SET energy_j=excluded.energy_j",
            [(ref.id, domain, energy) for domain, energy in totals.energy_j.items()]
            + ([(ref.id, GPU_IDLE_ROW, totals.gpu_idle_j)] if totals.gpu_idle_j > 0 else []),
        )
        self._db.executemany(
            "INSERT INTO job_work (job_id, unit, count) VALUES (?,?,?) "
            "ON CONFLICT(job_id, unit) DO UPDATE SET count=excluded.count",
            [(ref.id, unit, count) for unit, count in totals.work_units.items()],
        )
        self._db.execute(
            "INSERT INTO job_emissions VALUES (?,?) ON CONFLICT(job_id) DO UPDATE SET emissions_g=excluded.emissions_g",
            (ref.id, totals.emissions_g),
        )

    def flush(
        self, counters: dict[str, tuple[int, int]] | None = None, boot_id: str = "", monotonic_s: float = 0.0
    ) -> bool:
        """Write every changed total in one transaction. False on failure."""
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "INSERT INTO node_energy VALUES (?,?,?,?) ON CONFLICT(domain, device, source) "
                    "DO UPDATE SET energy_j=excluded.energy_j",
                    [(*key, energy) for key, energy in self._node_energy_j.items()],
                )
                db.executemany(
                    "INSERT INTO domain_totals VALUES (?,?,?) ON CONFLICT(domain) DO UPDATE SET "
                    "idle_j=excluded.idle_j, unattributed_j=excluded.unattributed_j",
                    [
                        (d, self._idle_j.get(d, 0.0), self._unattributed_j.get(d, 0.0))
                        for d in set(self._idle_j) | set(self._unattributed_j)
                    ],
                )
                db.execute(
                    "INSERT INTO node_emissions VALUES (0, ?) ON CONFLICT(id) DO UPDATE SET "
                    "emissions_g=excluded.emissions_g",
                    (self.node_emissions_g,),
                )
                for job_id in self._dirty_jobs:
                    record = self._jobs.get(job_id)
                    if record is not None:
                        self._write_job(record)
                for zone_id, (raw, max_range) in (counters or {}).items():
                    db.execute(
                        "INSERT INTO counters VALUES (?,?,?,?,?) ON CONFLICT(zone_id) DO UPDATE SET "
                        "raw_uj=excluded.raw_uj, max_range_uj=excluded.max_range_uj, "
                        "boot_id=excluded.boot_id, monotonic_s=excluded.monotonic_s",
                        (zone_id, raw, max_range, boot_id, monotonic_s),
                    )
                db.execute("COMMIT")
            except (sqlite3.Error, OSError) as exc:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                self.flush_errors += 1
                self.last_flush_error = str(exc)
                return False
            self._dirty_jobs.clear()
            self.last_flush_unix = time.time()
            return True

    # -- queries -------------------------------------------------------------
    @property
    def jobs(self) -> Mapping[str, JobView]:
        """Every job in memory, by id (a copy)."""
        with self._lock:
            return MappingProxyType({job_id: r.view() for job_id, r in self._jobs.items()})

    def job_ids(self) -> list[str]:
        with self._lock:
            return list(self._jobs)

    def read(self) -> LedgerReading:
        """Node, domain and job totals, copied under the lock. Views of jobs
        that did not change since the last read are the same objects."""
        with self._lock:
            power = self._node_power_w
            return LedgerReading(
                devices=tuple(
                    DeviceView(domain, device, source, energy, power.get((domain, device, source), 0.0))
                    for (domain, device, source), energy in sorted(self._node_energy_j.items())
                ),
                idle_j=dict(self._idle_j),
                unattributed_j=dict(self._unattributed_j),
                node_emissions_g=self.node_emissions_g,
                jobs=tuple(r.view() for r in self._jobs.values()),
                last_flush_unix=self.last_flush_unix,
                flush_errors=self.flush_errors,
            )

    def job(self, job_id: str) -> JobView | None:
        with self._lock:
            record = self._jobs.get(job_id)
            if record is not None:
                return _fresh(record)
            try:
                loaded = self._load_job(job_id)
            except sqlite3.Error:
                return None
            return loaded.view() if loaded is not None else None

    def all_jobs(self, limit: int = 1000) -> list[JobView]:
        """Jobs in memory plus finished ones from SQLite, newest first."""
        with self._lock:
            views = {job_id: _fresh(r) for job_id, r in self._jobs.items()}
            try:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY last_seen DESC LIMIT ?", (limit,)).fetchall()
            except sqlite3.Error:
                rows = []
            for row in rows:
                if row["id"] not in views:
                    energy = {
                        r["domain"]: r["energy_j"]
                        for r in self._db.execute(
                            "SELECT domain, energy_j FROM job_energy WHERE job_id = ?", (row["id"],)
                        )
                    }
                    views[row["id"]] = self._record_from_row(
                        row, energy, self._work_of(row["id"]), self._saved_emissions_g(row["id"])
                    ).view()
        return sorted(views.values(), key=lambda v: v.last_seen, reverse=True)[:limit]

    def close(self) -> None:
        with self._lock:
            self._db.close()
