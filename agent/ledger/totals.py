"""Cumulative energy per node, domain and job: in memory, durable in SQLite.

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
from dataclasses import dataclass, field
from pathlib import Path

from agent.model import DeviceEnergy, DomainAttribution, JobRef, ProcessKey
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


class LedgerError(RuntimeError):
    pass


@dataclass
class JobRecord:
    ref: JobRef
    labels: dict[str, str]
    first_seen: float
    last_seen: float
    finished_at: float | None = None
    cpu_s: float = 0.0
    energy_j: dict[str, float] = field(default_factory=dict)
    power_w: dict[str, float] = field(default_factory=dict)
    processes: int = 0
    registration: RegisteredJob | None = None
    work_units: dict[str, float] = field(default_factory=dict)  # reported work, by unit
    emissions_g: float = 0.0  # gCO2eq, each tick charged at the intensity in force during it
    gpu_idle_j: float = 0.0  # allocated-but-idle GPU energy, part of energy_j["gpu"]


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


def _registration_to_json(job: RegisteredJob) -> str:
    return json.dumps({
        "roots": [[k.pid, k.start_ticks] for k in job.root_keys],
        "owner_uid": job.owner_uid,
        "registered_at": job.registered_at,
        "finish_reason": job.finish_reason,
    })


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
        self.node_energy_j: dict[tuple[str, str, str], float] = {}
        self.node_power_w: dict[tuple[str, str, str], float] = {}
        self.idle_j: dict[str, float] = {}
        self.unattributed_j: dict[str, float] = {}
        self.jobs: dict[str, JobRecord] = {}
        self.node_emissions_g = 0.0
        self._dirty_jobs: set[str] = set()  # to write at the next flush
        # Jobs whose exported view must be rebuilt: the snapshot builder reuses
        # the views of the others, and clears this set.
        self.views_stale: set[str] = set()
        self.last_flush_unix: float | None = None
        self.flush_errors = 0
        self.last_flush_error = ""
        self._load()

    # -- loading -------------------------------------------------------------
    def _load(self) -> None:
        db = self._db
        for row in db.execute("SELECT domain, device, source, energy_j FROM node_energy"):
            self.node_energy_j[(row["domain"], row["device"], row["source"])] = row["energy_j"]
        for row in db.execute("SELECT domain, idle_j, unattributed_j FROM domain_totals"):
            self.idle_j[row["domain"]] = row["idle_j"]
            self.unattributed_j[row["domain"]] = row["unattributed_j"]
        energy: dict[str, dict[str, float]] = {}
        for row in db.execute("SELECT job_id, domain, energy_j FROM job_energy"):
            energy.setdefault(row["job_id"], {})[row["domain"]] = row["energy_j"]
        # Finished jobs stay in SQLite; only running ones come back into memory.
        for row in db.execute("SELECT * FROM jobs WHERE finished_at IS NULL"):
            self.jobs[row["id"]] = self._record_from_row(row, energy.get(row["id"], {}), self._work_of(row["id"]))
            self.jobs[row["id"]].emissions_g = self._saved_emissions_g(row["id"])
        for row in db.execute("SELECT emissions_g FROM node_emissions"):
            self.node_emissions_g = row["emissions_g"]

    def _saved_emissions_g(self, job_id: str) -> float:
        row = self._db.execute("SELECT emissions_g FROM job_emissions WHERE job_id = ?", (job_id,)).fetchone()
        return row["emissions_g"] if row else 0.0

    def _work_of(self, job_id: str) -> dict[str, float]:
        return {r["unit"]: r["count"] for r in
                self._db.execute("SELECT unit, count FROM job_work WHERE job_id = ?", (job_id,))}

    @staticmethod
    def _record_from_row(row: sqlite3.Row, energy: dict[str, float], work: dict[str, float]) -> JobRecord:
        energy = dict(energy)
        gpu_idle_j = energy.pop(GPU_IDLE_ROW, 0.0)
        return JobRecord(
            gpu_idle_j=gpu_idle_j,
            ref=JobRef(row["id"], row["name"], row["kind"], row["namespace"]),
            labels=json.loads(row["labels"]),
            first_seen=row["first_seen"],
            last_seen=row["last_seen"],
            finished_at=row["finished_at"],
            cpu_s=row["cpu_s"],
            energy_j=dict(energy),
            registration=_registration_from_row(row) if row["registration"] else None,
            work_units=dict(work),
        )

    def saved_counters(self) -> dict[str, SavedCounter]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM counters").fetchall()
        return {r["zone_id"]: SavedCounter(r["raw_uj"], r["max_range_uj"], r["boot_id"], r["monotonic_s"])
                for r in rows}

    def registered_jobs(self) -> list[RegisteredJob]:
        """Registered jobs that had not finished when the agent last stopped."""
        return [r.registration for r in self.jobs.values() if r.registration and r.finished_at is None]

    def _changed(self, job_id: str) -> None:
        self._dirty_jobs.add(job_id)
        self.views_stale.add(job_id)

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
            stale = self.views_stale
            for job_id, energy_j in (gpu_idle_j or {}).items():
                record = self.jobs.get(job_id)
                if record is not None:
                    record.gpu_idle_j += energy_j
                    stale.add(job_id)
            self.node_power_w = {}
            for reading in devices:
                key = (reading.domain, reading.device, reading.source)
                self.node_energy_j[key] = self.node_energy_j.get(key, 0.0) + reading.energy_j
                self.node_power_w[key] = reading.power_w
            job_power: dict[str, dict[str, float]] = {}
            for part in parts:
                self.idle_j[part.domain] = self.idle_j.get(part.domain, 0.0) + part.idle_j
                self.unattributed_j[part.domain] = self.unattributed_j.get(part.domain, 0.0) + part.unattributed_j
                for job_id, energy_j in part.jobs_j.items():
                    record = self.jobs.get(job_id)
                    if record is None:
                        continue
                    record.energy_j[part.domain] = record.energy_j.get(part.domain, 0.0) + energy_j
                    job_power.setdefault(job_id, {})[part.domain] = energy_j / interval_s if interval_s > 0 else 0.0
                    stale.add(job_id)
            no_power: dict[str, float] = {}
            for job_id, record in self.jobs.items():
                seen = activity.get(job_id)
                power = job_power.get(job_id, no_power)
                if power != record.power_w:
                    record.power_w = power
                    stale.add(job_id)
                if seen is not None:
                    if seen.cpu_s or seen.processes != record.processes or record.finished_at is not None:
                        stale.add(job_id)
                    record.cpu_s += seen.cpu_s
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
                    stale.add(job_id)

    def book_emissions(self, jobs_g: dict[str, float], node_g: float) -> None:
        """Add one tick's emissions to the jobs and the node (grams, never negative)."""
        with self._lock:
            if node_g > 0 and math.isfinite(node_g):
                self.node_emissions_g += node_g
            for job_id, grams in jobs_g.items():
                record = self.jobs.get(job_id)
                if record is not None and grams > 0 and math.isfinite(grams):
                    record.emissions_g += grams
                    self._changed(job_id)

    def ensure_job(self, ref: JobRef, now_unix: float, labels: dict[str, str] | None = None,
                   registration: RegisteredJob | None = None) -> JobRecord:
        """The record for a job, created (or brought back from SQLite) if needed."""
        with self._lock:
            record = self.jobs.get(ref.id)
            if record is None:
                record = self._load_job(ref.id) or JobRecord(ref, dict(labels or {}), now_unix, now_unix)
                self.jobs[ref.id] = record
            elif record.ref != ref:
                record.ref = ref  # a name learnt later (a Slurm job's, from its environment)
            if registration is not None:
                record.registration = registration
                record.labels = dict(registration.labels)
                record.finished_at = registration.finished_at
            elif labels is not None:
                record.labels = dict(labels)
            self._changed(ref.id)
            return record

    def _load_job(self, job_id: str) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        energy = {r["domain"]: r["energy_j"] for r in
                  self._db.execute("SELECT domain, energy_j FROM job_energy WHERE job_id = ?", (job_id,))}
        record = self._record_from_row(row, energy, self._work_of(job_id))
        record.emissions_g = self._saved_emissions_g(job_id)
        return record

    def add_work(self, job_id: str, unit: str, count: float) -> JobRecord | None:
        """Add reported units of work (samples, tokens, ...); durable with the next flush."""
        with self._lock:
            record = self.jobs.get(job_id)
            if record is None:
                return None
            record.work_units[unit] = record.work_units.get(unit, 0.0) + count
            self._changed(job_id)
            return record

    def add_unattributed(self, domain: str, energy_j: float) -> None:
        if energy_j > 0 and math.isfinite(energy_j):
            with self._lock:
                self.unattributed_j[domain] = self.unattributed_j.get(domain, 0.0) + energy_j

    def mark_finished(self, job_id: str, registration: RegisteredJob) -> None:
        with self._lock:
            record = self.jobs.get(job_id)
            if record is not None:
                record.registration = registration
                record.finished_at = registration.finished_at
                self._changed(job_id)

    def evict_finished(self, older_than_unix: float) -> list[str]:
        """Drop finished jobs from memory (they stay in SQLite). Flush first."""
        with self._lock:
            gone = [job_id for job_id, r in self.jobs.items()
                    if r.finished_at is not None and r.finished_at < older_than_unix
                    and job_id not in self._dirty_jobs]
            for job_id in gone:
                del self.jobs[job_id]
            return gone

    # -- persistence ---------------------------------------------------------
    def save_registration(self, job: RegisteredJob, now_unix: float) -> None:
        """Write a registration through at once: it must survive a crash."""
        record = self.ensure_job(job.ref, now_unix, registration=job)
        with self._lock:
            self._write_job(record)

    def _write_job(self, record: JobRecord) -> None:
        ref = record.ref
        self._db.execute(
            "INSERT INTO jobs (id, name, kind, namespace, labels, first_seen, last_seen, finished_at, cpu_s, "
            "registration) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET name=excluded.name, "
            "kind=excluded.kind, namespace=excluded.namespace, labels=excluded.labels, "
            "last_seen=excluded.last_seen, finished_at=excluded.finished_at, cpu_s=excluded.cpu_s, "
            "registration=excluded.registration",
            (ref.id, ref.name, ref.kind, ref.namespace, json.dumps(record.labels), record.first_seen,
             record.last_seen, record.finished_at, record.cpu_s,
             _registration_to_json(record.registration) if record.registration else None),
        )
        self._db.executemany(
            "INSERT INTO job_energy (job_id, domain, energy_j) VALUES (?,?,?) "
            "ON CONFLICT(job_id, domain) DO UPDATE SET energy_j=excluded.energy_j",
            [(ref.id, domain, energy) for domain, energy in record.energy_j.items()]
            + ([(ref.id, GPU_IDLE_ROW, record.gpu_idle_j)] if record.gpu_idle_j > 0 else []),
        )
        self._db.executemany(
            "INSERT INTO job_work (job_id, unit, count) VALUES (?,?,?) "
            "ON CONFLICT(job_id, unit) DO UPDATE SET count=excluded.count",
            [(ref.id, unit, count) for unit, count in record.work_units.items()],
        )
        self._db.execute("INSERT INTO job_emissions VALUES (?,?) ON CONFLICT(job_id) DO UPDATE SET "
                         "emissions_g=excluded.emissions_g", (ref.id, record.emissions_g))

    def flush(self, counters: dict[str, tuple[int, int]] | None = None, boot_id: str = "",
              monotonic_s: float = 0.0) -> bool:
        """Write every changed total in one transaction. False on failure."""
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "INSERT INTO node_energy VALUES (?,?,?,?) ON CONFLICT(domain, device, source) "
                    "DO UPDATE SET energy_j=excluded.energy_j",
                    [(*key, energy) for key, energy in self.node_energy_j.items()],
                )
                db.executemany(
                    "INSERT INTO domain_totals VALUES (?,?,?) ON CONFLICT(domain) DO UPDATE SET "
                    "idle_j=excluded.idle_j, unattributed_j=excluded.unattributed_j",
                    [(d, self.idle_j.get(d, 0.0), self.unattributed_j.get(d, 0.0))
                     for d in set(self.idle_j) | set(self.unattributed_j)],
                )
                db.execute("INSERT INTO node_emissions VALUES (0, ?) ON CONFLICT(id) DO UPDATE SET "
                           "emissions_g=excluded.emissions_g", (self.node_emissions_g,))
                for job_id in self._dirty_jobs:
                    record = self.jobs.get(job_id)
                    if record is not None:
                        self._write_job(record)
                for zone_id, (raw, max_range) in (counters or {}).items():
                    db.execute("INSERT INTO counters VALUES (?,?,?,?,?) ON CONFLICT(zone_id) DO UPDATE SET "
                               "raw_uj=excluded.raw_uj, max_range_uj=excluded.max_range_uj, "
                               "boot_id=excluded.boot_id, monotonic_s=excluded.monotonic_s",
                               (zone_id, raw, max_range, boot_id, monotonic_s))
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
    def job(self, job_id: str) -> JobRecord | None:
        with self._lock:
            record = self.jobs.get(job_id)
            if record is not None:
                return record
            try:
                return self._load_job(job_id)
            except sqlite3.Error:
                return None

    def all_jobs(self, limit: int = 1000) -> list[JobRecord]:
        """Jobs in memory plus finished ones from SQLite, newest first."""
        with self._lock:
            records = dict(self.jobs)
            try:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY last_seen DESC LIMIT ?", (limit,)).fetchall()
            except sqlite3.Error:
                rows = []
            for row in rows:
                if row["id"] not in records:
                    energy = {r["domain"]: r["energy_j"] for r in self._db.execute(
                        "SELECT domain, energy_j FROM job_energy WHERE job_id = ?", (row["id"],))}
                    records[row["id"]] = self._record_from_row(row, energy, self._work_of(row["id"]))
                    records[row["id"]].emissions_g = self._saved_emissions_g(row["id"])
        return sorted(records.values(), key=lambda r: r.last_seen, reverse=True)[:limit]

    def close(self) -> None:
        with self._lock:
            self._db.close()
