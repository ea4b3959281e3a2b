"""Cumulative energy per node, domain and job: in memory, durable in SQLite.

Readers and writers go through ``Ledger``'s methods, never its fields or its
lock. Writing: ``book_tick`` (one tick's split), ``book_emissions``,
``book_work``, ``book_unattributed`` (a tick that failed half-way),
``book_recovered`` (energy used while the agent was down), ``ensure_job`` /
``update_identity``, ``mark_finished``, ``set_members``, ``evict_finished``,
and ``commit`` (every tick). Written through at once, raising ``LedgerBusy``
with nothing changed when the file cannot be written: ``save_registration``
and ``add_work``. Reading: ``read`` (everything a snapshot needs, copied
under the lock), ``job``, ``all_jobs``, ``jobs``, ``has_job``,
``finished_before``, ``registered_jobs``, ``saved_counters``. Jobs come out
as immutable ``JobView``s carrying one ``JobTotals``.

The in-memory totals are authoritative while the agent runs; every tick's
``commit`` writes what changed in one transaction (WAL journal) before the
tick's snapshot is published, so no exported counter is ever ahead of the
file: after a crash the totals are loaded back and every counter resumes
at or above what was exported.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

from agent.ledger.exposition import Exposition, ExposureState
from agent.ledger.schema import LEDGER_FILE, LedgerBusy, LedgerError, open_ledger_db, open_ledger_db_read_only
from agent.model import (
    ATTRIBUTED_DOMAINS,
    NO_TOTALS,
    DeviceEnergy,
    DeviceView,
    DomainAttribution,
    JobRef,
    JobTotals,
    JobView,
    ProcessKey,
)
from agent.workloads.registry import RegisteredJob

# job_energy row that holds a job's allocated-but-idle GPU energy.
GPU_IDLE_ROW = "gpu_idle"
# The SQLite busy timeout: a locked file fails the write quickly (the tick
# retries at the next one, an API call answers 503) instead of stalling.
BUSY_TIMEOUT_S = 0.2


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
    members: tuple[ProcessKey, ...] = ()  # a registered job's processes as last stored
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
    exposed: tuple[JobView, ...]  # what the last commit wrote: exported jobs, then the overflow aggregate
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


def _registration_to_json(job: RegisteredJob, members: tuple[ProcessKey, ...] = ()) -> str:
    return json.dumps(
        {
            "roots": [[k.pid, k.start_ticks] for k in job.root_keys],
            "members": [[k.pid, k.start_ticks] for k in members],
            "owner_uid": job.owner_uid,
            "registered_at": job.registered_at,
            "finish_reason": job.finish_reason,
        }
    )


def _registration_from_row(row: sqlite3.Row) -> tuple[RegisteredJob, tuple[ProcessKey, ...]]:
    data = json.loads(row["registration"])
    registration = RegisteredJob(
        ref=JobRef(row["id"], row["name"], row["kind"], row["namespace"]),
        labels=json.loads(row["labels"]),
        root_keys=tuple(ProcessKey(pid, start) for pid, start in data["roots"]),
        owner_uid=data["owner_uid"],
        registered_at=data["registered_at"],
        finished_at=row["finished_at"],
        finish_reason=data.get("finish_reason", ""),
    )
    return registration, tuple(ProcessKey(pid, start) for pid, start in data.get("members", ()))


def totals_to_json(totals: JobTotals) -> str:
    return json.dumps(
        {
            "energy_j": totals.energy_j,
            "cpu_s": totals.cpu_s,
            "work_units": totals.work_units,
            "emissions_g": totals.emissions_g,
            "gpu_idle_j": totals.gpu_idle_j,
        }
    )


def totals_from_json(text: str | None) -> JobTotals:
    if not text:
        return NO_TOTALS
    data = json.loads(text)
    return JobTotals(
        energy_j={str(k): float(v) for k, v in data.get("energy_j", {}).items()},
        cpu_s=float(data.get("cpu_s", 0.0)),
        work_units={str(k): float(v) for k, v in data.get("work_units", {}).items()},
        emissions_g=float(data.get("emissions_g", 0.0)),
        gpu_idle_j=float(data.get("gpu_idle_j", 0.0)),
    )


# Every job's row with its totals, newest first, in one statement (each
# subquery is a primary-key range scan).
# A job's row and emissions; its energy and work rows are read for the same
# selection in one statement each, so any number of jobs costs three statements.
JOB_ROWS = "SELECT j.*, (SELECT emissions_g FROM job_emissions m WHERE m.job_id = j.id) AS emissions FROM jobs j "
LIST_JOBS = "ORDER BY j.last_seen DESC LIMIT ?"
JOB_BY_ID = "WHERE j.id = ?"
# Loaded at start: running jobs, and finished ones still inside their retention.
JOBS_TO_LOAD = "WHERE j.finished_at IS NULL OR j.finished_at > ? ORDER BY j.first_seen, j.id"


def read_jobs(db: sqlite3.Connection, selection: str, params: tuple[object, ...]) -> list[JobRecord]:
    """The jobs ``selection`` (a WHERE / ORDER BY / LIMIT tail over ``jobs j``) picks, with their totals."""
    rows = db.execute(JOB_ROWS + selection, params).fetchall()
    if not rows:
        return []
    chosen = f"SELECT j.id FROM jobs j {selection}"
    energy: dict[str, dict[str, float]] = {}
    for job_id, domain, joules in db.execute(
        f"SELECT job_id, domain, energy_j FROM job_energy WHERE job_id IN ({chosen})", params
    ):
        energy.setdefault(job_id, {})[domain] = joules
    work: dict[str, dict[str, float]] = {}
    for job_id, unit, count in db.execute(
        f"SELECT job_id, unit, count FROM job_work WHERE job_id IN ({chosen})", params
    ):
        work.setdefault(job_id, {})[unit] = count
    return [_record(row, energy.get(row["id"], {}), work.get(row["id"], {})) for row in rows]


def _record(row: sqlite3.Row, energy: dict[str, float], work: dict[str, float]) -> JobRecord:
    gpu_idle_j = energy.pop(GPU_IDLE_ROW, 0.0)
    registration, members = _registration_from_row(row) if row["registration"] else (None, ())
    return JobRecord(
        ref=JobRef(row["id"], row["name"], row["kind"], row["namespace"]),
        labels=json.loads(row["labels"]),
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
        finished_at=row["finished_at"],
        totals=JobTotals(
            energy_j=energy,
            cpu_s=row["cpu_s"],
            work_units=work,
            emissions_g=row["emissions"] or 0.0,
            gpu_idle_j=gpu_idle_j,
        ),
        registration=registration,
        members=members,
    )


def _grew(growth: JobTotals) -> bool:
    return bool(growth.cpu_s or growth.gpu_idle_j or any(growth.energy_j.values()))


class Ledger:
    """The totals, in memory and in ``<state_dir>/ledger.sqlite3``.

    ``commit`` runs every tick: one transaction with the node's rows and the
    rows of every job whose totals changed, so what a snapshot exports after
    a tick is already durable (a commit in WAL mode survives the process
    being killed). Rows that only record when a job was last seen are
    written by the ``full`` commit every flush interval.
    """

    def __init__(
        self,
        state_dir: Path,
        max_exported_jobs: int = 1_000_000,
        retain_finished_s: float = 0.0,
        read_only: bool = False,
        prune_finished_after_s: float = 0.0,
    ) -> None:
        self.path = state_dir / LEDGER_FILE
        self.read_only = read_only
        self.prune_finished_after_s = prune_finished_after_s
        self._last_prune_mono = -math.inf
        self._reader: sqlite3.Connection | None = None  # for API reads: never takes the ledger's lock
        self._reader_lock = threading.Lock()
        self._db = open_ledger_db_read_only(state_dir) if read_only else open_ledger_db(state_dir, BUSY_TIMEOUT_S)
        self._lock = threading.RLock()
        self._node_energy_j: dict[tuple[str, str, str], float] = {}
        self._node_power_w: dict[tuple[str, str, str], float] = {}
        self._idle_j: dict[str, float] = {}
        self._unattributed_j: dict[str, float] = {}
        self._jobs: dict[str, JobRecord] = {}
        self.node_emissions_g = 0.0
        self._dirty_jobs: set[str] = set()  # identity or state changed: the whole row at the next commit
        self._grown_jobs: set[str] = set()  # only totals grew: their rows at the next commit
        self._seen_jobs: set[str] = set()  # only last_seen changed: written by the next full commit
        self._exposition = Exposition(max_exported_jobs)
        self._exposed: tuple[JobView, ...] = ()
        self.agent_counters: dict[str, object] = {}  # the agent's own counters as last loaded
        self.last_flush_unix: float | None = None
        self.flush_errors = 0
        self.last_flush_error = ""
        if not read_only:
            self._load(time.time() - retain_finished_s if retain_finished_s > 0 else None)

    # -- loading -------------------------------------------------------------
    def _load(self, finished_after_unix: float | None) -> None:
        db = self._db
        for row in db.execute("SELECT domain, device, source, energy_j FROM node_energy"):
            self._node_energy_j[(row["domain"], row["device"], row["source"])] = row["energy_j"]
        for row in db.execute("SELECT domain, idle_j, unattributed_j FROM domain_totals"):
            self._idle_j[row["domain"]] = row["idle_j"]
            self._unattributed_j[row["domain"]] = row["unattributed_j"]
        for row in db.execute("SELECT emissions_g FROM node_emissions"):
            self.node_emissions_g = row["emissions_g"]
        for row in db.execute("SELECT name, value FROM agent_counters"):
            self.agent_counters[row["name"]] = json.loads(row["value"])
        # Running jobs come back into memory, and finished ones still inside
        # their retention (their series stay until it ends); the rest stay in SQLite.
        for record in read_jobs(
            db, JOBS_TO_LOAD, (finished_after_unix if finished_after_unix is not None else math.inf,)
        ):
            self._jobs[record.ref.id] = record
        exposition = self._exposition
        for row in db.execute("SELECT retired, floor FROM overflow"):
            exposition.retired = totals_from_json(row["retired"])
            exposition.floor = totals_from_json(row["floor"])
        for row in db.execute("SELECT job_id, state, baseline FROM exposition ORDER BY rowid"):
            job_id, state, baseline = row["job_id"], ExposureState(row["state"]), totals_from_json(row["baseline"])
            if job_id in self._jobs:
                exposition.restore(job_id, state, baseline)
                continue
            # Finished and past its retention while the agent was down: it leaves the exposition now.
            exposition.restore(job_id, state, baseline)
            gone = self._load_job(job_id)
            exposition.retire(job_id, gone.totals if gone is not None else baseline)
        for job_id, record in self._jobs.items():
            exposition.admit(job_id, record.totals)  # jobs a version-1 ledger never placed
        self._exposed, _ = exposition.select(r.view() for r in self._jobs.values())

    def _load_job(self, job_id: str) -> JobRecord | None:
        found = read_jobs(self._db, JOB_BY_ID, (job_id,))
        return found[0] if found else None

    def saved_counters(self) -> dict[str, SavedCounter]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM counters").fetchall()
        return {
            r["zone_id"]: SavedCounter(r["raw_uj"], r["max_range_uj"], r["boot_id"], r["monotonic_s"]) for r in rows
        }

    def registered_jobs(self) -> list[tuple[RegisteredJob, tuple[ProcessKey, ...]]]:
        """Registered jobs that had not finished when the agent last stopped,
        each with the member processes (roots and descendants) last stored."""
        return [
            (r.registration, r.members or r.registration.root_keys)
            for r in self._jobs.values()
            if r.registration and r.finished_at is None
        ]

    def _changed(self, job_id: str) -> None:
        self._dirty_jobs.add(job_id)
        record = self._jobs.get(job_id)
        if record is not None:
            record._view = None

    def _grown(self, job_id: str) -> None:
        self._grown_jobs.add(job_id)
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
                    growth = JobTotals(energy_j=energy or {}, cpu_s=cpu_s, gpu_idle_j=idle or 0.0)
                    if _grew(growth):
                        record.totals = record.totals + growth
                        record._view = None
                        self._grown_jobs.add(job_id)
                power = job_power.get(job_id, no_power)
                if power != record.power_w:
                    record.power_w = power
                    record._view = None
                if seen is not None:
                    if seen.processes != record.processes or record.finished_at is not None:
                        record._view = None
                    record.processes = seen.processes
                    record.last_seen = now_unix
                    if record.registration is None and record.finished_at is not None:
                        record.finished_at = None  # a pod or unit seen again is running again
                        self._dirty_jobs.add(job_id)
                    self._seen_jobs.add(job_id)
                elif record.finished_at is None and record.registration is None:
                    record.processes = 0
                    record.finished_at = now_unix
                    self._changed(job_id)
                elif record.processes:
                    record.processes = 0
                    record._view = None

    def book_unattributed(self, devices: list[DeviceEnergy]) -> None:
        """A tick that failed after its sensors were read: the energy they
        measured is the node's, and nobody's job is charged (their baselines
        have already moved on, so it would be lost otherwise)."""
        with self._lock:
            for reading in devices:
                key = (reading.domain, reading.device, reading.source)
                self._node_energy_j[key] = self._node_energy_j.get(key, 0.0) + reading.energy_j
                if reading.domain in ATTRIBUTED_DOMAINS:
                    self._unattributed_j[reading.domain] = self._unattributed_j.get(reading.domain, 0.0) + (
                        reading.energy_j
                    )

    def book_emissions(self, jobs_g: dict[str, float], node_g: float) -> None:
        """Add one tick's emissions to the jobs and the node (grams, never negative)."""
        with self._lock:
            if node_g > 0 and math.isfinite(node_g):
                self.node_emissions_g += node_g
            for job_id, grams in jobs_g.items():
                record = self._jobs.get(job_id)
                if record is not None and grams > 0 and math.isfinite(grams):
                    record.totals = record.totals + JobTotals(emissions_g=grams)
                    self._grown(job_id)

    def ensure_job(
        self,
        ref: JobRef,
        now_unix: float,
        labels: dict[str, str] | None = None,
        registration: RegisteredJob | None = None,
    ) -> JobView:
        """A job, created (or brought back from SQLite) if needed, and placed in
        the exposition; its name, labels and registration updated where given."""
        with self._lock:
            record = self._jobs.get(ref.id)
            if record is None:
                record = self._load_job(ref.id) or JobRecord(ref, dict(labels or {}), now_unix, now_unix)
                self._jobs[ref.id] = record
                self._exposition.admit(ref.id, record.totals)
            elif record.ref != ref:
                record.ref = ref  # a name learnt later (a Slurm job's, from its environment)
            self._apply(record, labels, registration)
            self._changed(ref.id)
            return record.view()

    @staticmethod
    def _apply(record: JobRecord, labels: dict[str, str] | None, registration: RegisteredJob | None) -> None:
        if registration is not None:
            record.registration = registration
            record.labels = registration.labels  # a registration's labels are never mutated either
            record.finished_at = registration.finished_at
        elif labels is not None:
            record.labels = dict(labels)

    def has_job(self, job_id: str) -> bool:
        """Whether the job is in memory (running, or finished and retained)."""
        return job_id in self._jobs

    def update_identity(self, ref: JobRef, now_unix: float, labels: dict[str, str] | None = None) -> None:
        """Take a name learnt later (a Slurm job's) or new info labels, where they differ."""
        record = self._jobs.get(ref.id)
        if record is None or record.ref != ref or (labels is not None and record.labels != labels):
            self.ensure_job(ref, now_unix, labels=labels)

    def book_work(self, job_id: str, unit: str, count: float) -> None:
        """Add work read on the tick's path (serving engines); durable with the tick's commit."""
        with self._lock:
            record = self._jobs.get(job_id)
            if record is not None:  # a job already gone from memory drops it
                record.totals = record.totals + JobTotals(work_units={unit: count})
                self._grown(job_id)

    def add_work(self, job_id: str, unit: str, count: float) -> JobView | None:
        """Add reported units of work (samples, tokens, ...), written through
        before it returns; raises LedgerBusy, having changed nothing, when the
        file cannot be written."""
        with self._lock:
            record = self._jobs.get(job_id)
            if record is None:
                return None
            totals = record.totals + JobTotals(work_units={unit: count})
            self._write_through(
                lambda: self._db.execute(
                    "INSERT INTO job_work (job_id, unit, count) VALUES (?,?,?) "
                    "ON CONFLICT(job_id, unit) DO UPDATE SET count=excluded.count",
                    (job_id, unit, totals.work_units[unit]),
                )
            )
            record.totals = totals
            record._view = None
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

    def set_members(self, job_id: str, members: tuple[ProcessKey, ...]) -> None:
        """The processes of a registered job now (roots and adopted descendants),
        stored so that a restart finds the job while any of them runs."""
        with self._lock:
            record = self._jobs.get(job_id)
            if record is not None and record.members != members:
                record.members = members
                self._dirty_jobs.add(job_id)

    def finished_before(self, older_than_unix: float) -> list[JobView]:
        """Jobs in memory that finished before the given time."""
        with self._lock:
            return [
                r.view() for r in self._jobs.values() if r.finished_at is not None and r.finished_at < older_than_unix
            ]

    def evict_finished(self, older_than_unix: float) -> list[str]:
        """Drop finished jobs whose rows are written from memory (they stay in
        SQLite) and from the exposition."""
        with self._lock:
            gone = [
                job_id
                for job_id, r in self._jobs.items()
                if r.finished_at is not None
                and r.finished_at < older_than_unix
                and job_id not in self._dirty_jobs
                and job_id not in self._grown_jobs
                and job_id not in self._seen_jobs
            ]
            for job_id in gone:
                self._exposition.retire(job_id, self._jobs.pop(job_id).totals)
            return gone

    # -- persistence ---------------------------------------------------------
    def _write_through(self, write: Callable[[], object]) -> None:
        """Run ``write`` in its own transaction; LedgerBusy (nothing written) if it cannot."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            write()
            db.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            _rollback(db)
            self.flush_errors += 1
            self.last_flush_error = str(exc)
            raise LedgerBusy(f"the ledger cannot be written now ({exc}); nothing was changed, try again") from None

    def save_registration(self, job: RegisteredJob, now_unix: float) -> JobView:
        """Write a registration (new, or finished) through before it counts:
        it must survive a crash. Raises LedgerBusy, having changed nothing."""
        with self._lock:
            existing = self._jobs.get(job.ref.id)
            record = existing or self._load_job(job.ref.id) or JobRecord(job.ref, job.labels, now_unix, now_unix)
            staged = replace(record, _view=None)
            self._apply(staged, None, job)
            state_before = self._exposition.state(job.ref.id)
            placement = None
            if state_before is None:
                probe = Exposition(
                    self._exposition.cap, set(self._exposition.exported), dict(self._exposition.overflow)
                )
                probe.admit(job.ref.id, staged.totals)
                placement = probe.state(job.ref.id), probe.overflow.get(job.ref.id)

            def write() -> None:
                self._write_job(staged)
                if placement is not None:
                    self._write_exposition_row(job.ref.id, placement[0], placement[1])

            self._write_through(write)
            if existing is None:
                self._jobs[job.ref.id] = record
                self._exposition.admit(job.ref.id, record.totals)
                self._exposition.pending.pop(job.ref.id, None)  # written above
            self._apply(record, None, job)
            record._view = None
            return record.view()

    def _write_exposition_row(self, job_id: str, state: ExposureState | None, baseline: JobTotals | None) -> None:
        if state is None:
            self._db.execute("DELETE FROM exposition WHERE job_id = ?", (job_id,))
        else:
            self._db.execute(
                "INSERT INTO exposition VALUES (?,?,?) ON CONFLICT(job_id) DO UPDATE SET "
                "state=excluded.state, baseline=excluded.baseline",
                (job_id, str(state), totals_to_json(baseline) if baseline else None),
            )

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
                _registration_to_json(record.registration, record.members) if record.registration else None,
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
        if totals.emissions_g:
            self._db.execute(
                "INSERT INTO job_emissions VALUES (?,?) ON CONFLICT(job_id) DO UPDATE SET "
                "emissions_g=excluded.emissions_g",
                (ref.id, totals.emissions_g),
            )

    def _write_totals(self, records: list[JobRecord]) -> None:
        """The rows of jobs whose totals grew, a statement per table for all of them."""
        if not records:
            return
        db = self._db
        db.executemany(
            "UPDATE jobs SET cpu_s = ?, last_seen = ? WHERE id = ?",
            [(r.totals.cpu_s, r.last_seen, r.ref.id) for r in records],
        )
        db.executemany(
            "INSERT INTO job_energy (job_id, domain, energy_j) VALUES (?,?,?) "
            "ON CONFLICT(job_id, domain) DO UPDATE SET energy_j=excluded.energy_j",
            [(r.ref.id, domain, energy) for r in records for domain, energy in r.totals.energy_j.items()]
            + [(r.ref.id, GPU_IDLE_ROW, r.totals.gpu_idle_j) for r in records if r.totals.gpu_idle_j > 0],
        )
        db.executemany(
            "INSERT INTO job_work (job_id, unit, count) VALUES (?,?,?) "
            "ON CONFLICT(job_id, unit) DO UPDATE SET count=excluded.count",
            [(r.ref.id, unit, count) for r in records for unit, count in r.totals.work_units.items()],
        )
        db.executemany(
            "INSERT INTO job_emissions VALUES (?,?) ON CONFLICT(job_id) DO UPDATE SET emissions_g=excluded.emissions_g",
            [(r.ref.id, r.totals.emissions_g) for r in records if r.totals.emissions_g],
        )

    def commit(
        self,
        counters: dict[str, tuple[int, int]] | None = None,
        boot_id: str = "",
        monotonic_s: float = 0.0,
        agent_counters: Mapping[str, object] | None = None,
        full: bool = True,
    ) -> bool:
        """Write every changed total, the exposition and the overflow aggregate
        in one transaction, then publish the exported jobs it wrote. False on
        failure: nothing is published, everything stays to be written next time."""
        with self._lock:
            db = self._db
            exposition = self._exposition
            exposed, aggregate = exposition.select(r.view() for r in self._jobs.values())
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
                written = self._dirty_jobs
                for job_id in written:
                    record = self._jobs.get(job_id)
                    if record is not None:
                        self._write_job(record)
                self._write_totals([self._jobs[j] for j in self._grown_jobs - written if j in self._jobs])
                if full:
                    # Seen and otherwise unchanged: only their last_seen, in one statement.
                    db.executemany(
                        "UPDATE jobs SET last_seen = ? WHERE id = ?",
                        [
                            (self._jobs[j].last_seen, j)
                            for j in self._seen_jobs - written - self._grown_jobs
                            if j in self._jobs
                        ],
                    )
                for job_id, state in exposition.pending.items():
                    self._write_exposition_row(job_id, state, exposition.overflow.get(job_id))
                if aggregate is not exposition.floor or exposition.aggregate_changed:
                    db.execute(
                        "INSERT INTO overflow VALUES (0,?,?) ON CONFLICT(id) DO UPDATE SET "
                        "retired=excluded.retired, floor=excluded.floor",
                        (totals_to_json(exposition.retired), totals_to_json(aggregate)),
                    )
                db.executemany(
                    "INSERT INTO counters VALUES (?,?,?,?,?) ON CONFLICT(zone_id) DO UPDATE SET "
                    "raw_uj=excluded.raw_uj, max_range_uj=excluded.max_range_uj, "
                    "boot_id=excluded.boot_id, monotonic_s=excluded.monotonic_s",
                    [
                        (zone_id, raw, max_range, boot_id, monotonic_s)
                        for zone_id, (raw, max_range) in (counters or {}).items()
                    ],
                )
                db.executemany(
                    "INSERT INTO agent_counters VALUES (?,?) ON CONFLICT(name) DO UPDATE SET value=excluded.value",
                    [(name, json.dumps(value)) for name, value in (agent_counters or {}).items()],
                )
                db.execute("COMMIT")
            except (sqlite3.Error, OSError) as exc:
                _rollback(db)
                self.flush_errors += 1
                self.last_flush_error = str(exc)
                return False
            if full:
                self._seen_jobs.clear()
            else:
                self._seen_jobs.difference_update(self._dirty_jobs)  # their rows carry last_seen too
                self._seen_jobs.difference_update(self._grown_jobs)
            self._dirty_jobs.clear()
            self._grown_jobs.clear()
            exposition.pending.clear()
            exposition.aggregate_changed = False
            exposition.floor = aggregate
            self._exposed = exposed
            self.last_flush_unix = time.time()
            return True

    def flush(
        self, counters: dict[str, tuple[int, int]] | None = None, boot_id: str = "", monotonic_s: float = 0.0
    ) -> bool:
        """A full commit (on finishing a job, and on the way out)."""
        return self.commit(counters, boot_id, monotonic_s, full=True)

    # -- queries -------------------------------------------------------------
    @property
    def jobs(self) -> Mapping[str, JobView]:
        """Every job in memory, by id (a copy)."""
        with self._lock:
            return MappingProxyType({job_id: r.view() for job_id, r in self._jobs.items()})

    def exposition_size(self) -> tuple[int, int]:
        """Jobs with series of their own, and jobs summed into the overflow aggregate."""
        with self._lock:
            return len(self._exposition.exported), len(self._exposition.overflow)

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
                exposed=self._exposed,
                last_flush_unix=self.last_flush_unix,
                flush_errors=self.flush_errors,
            )

    def job(self, job_id: str) -> JobView | None:
        """A job in memory, or one from the file (read outside the ledger's lock)."""
        with self._lock:
            record = self._jobs.get(job_id)
            if record is not None:
                return _fresh(record)
        try:
            with self._reader_lock:
                found = read_jobs(self._reading(), JOB_BY_ID, (job_id,))
        except sqlite3.Error:
            return None
        return found[0].view() if found else None

    def all_jobs(self, limit: int = 1000) -> list[JobView]:
        """Jobs in memory plus finished ones from SQLite, newest first. The
        file is read in three statements on a connection of its own, outside
        the ledger's lock, so a reader never holds up the tick."""
        with self._lock:
            views = {job_id: _fresh(r) for job_id, r in self._jobs.items()}
        try:
            with self._reader_lock:
                listed = read_jobs(self._reading(), LIST_JOBS, (limit,))
        except sqlite3.Error:
            listed = []
        for record in listed:
            if record.ref.id not in views:
                views[record.ref.id] = record.view()
        return sorted(views.values(), key=lambda v: v.last_seen, reverse=True)[:limit]

    def _reading(self) -> sqlite3.Connection:
        if self.read_only:
            return self._db
        if self._reader is None:
            self._reader = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False, timeout=BUSY_TIMEOUT_S
            )
            self._reader.row_factory = sqlite3.Row
        return self._reader

    def prune(self, now_unix: float) -> int:
        """Delete the rows of jobs that finished more than ``prune_finished_after_s``
        ago (never those in memory); at most once a minute. Returns how many went."""
        if self.prune_finished_after_s <= 0 or time.monotonic() - self._last_prune_mono < 60.0:
            return 0
        self._last_prune_mono = time.monotonic()
        cutoff = now_unix - self.prune_finished_after_s
        with self._lock:
            keep = list(self._jobs)
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                gone = [
                    r[0]
                    for r in db.execute(
                        "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ? LIMIT 10000", (cutoff,)
                    )
                    if r[0] not in keep
                ]
                for table, column in (
                    ("job_energy", "job_id"),
                    ("job_work", "job_id"),
                    ("job_emissions", "job_id"),
                    ("jobs", "id"),
                ):
                    db.executemany(f"DELETE FROM {table} WHERE {column} = ?", [(job_id,) for job_id in gone])
                db.execute("COMMIT")
            except (sqlite3.Error, OSError) as exc:
                _rollback(db)
                self.last_flush_error = str(exc)
                return 0
            return len(gone)

    def close(self) -> None:
        with self._lock:
            self._db.close()
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()


def _rollback(db: sqlite3.Connection) -> None:
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error:
        pass


__all__ = ["JobActivity", "Ledger", "LedgerBusy", "LedgerError", "LedgerReading", "SavedCounter"]
