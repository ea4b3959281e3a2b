"""The sampling loop: sensors -> workloads -> attribution -> ledger -> snapshot.

One ``Agent`` owns every stage. ``tick`` runs one sample; ``run`` repeats it on
the monotonic clock until ``stop``. Everything readers need is published as an
immutable ``Snapshot``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field, replace

from agent.attribution.cpu import IdlePowerEstimator, jobs_energy_j, split_domain
from agent.attribution.gpu import GpuIdleTracker
from agent.carbon import emissions, intensity
from agent.config import Config
from agent.ledger.totals import JobActivity, Ledger
from agent.model import ATTRIBUTED_DOMAINS, NO_TOTALS, DeviceEnergy, DomainAttribution, JobRef, JobTotals, TickContext
from agent.pipeline.snapshot import (
    EMPTY_SNAPSHOT,
    OVERFLOW_JOB,
    CarbonView,
    DurationCounts,
    Health,
    JobView,
    Snapshot,
)
from agent.sensors import SensorSet, build_sensors
from agent.sensors.counters import recoverable_downtime_energy_j
from agent.workloads.cgroupcpu import CgroupCounter, CgroupCpuReader, JobProcesses, group_jobs
from agent.workloads.kubelet import KubeletPoller, KubeletSettings
from agent.workloads.procfs import ProcessScanner, Scan, ScannedProcess
from agent.workloads.registry import RegisteredJob, Registry, UnknownJob, read_process_key
from agent.workloads.resolve import JobResolver
from agent.workloads.worksources import JobMembers, WorkSourcePoller, WorkSourceSettings

log = logging.getLogger("jouleward")
FINISH_SAMPLE_GAP_S = 0.5


def kubelet_settings(config: Config) -> KubeletSettings:
    return KubeletSettings(
        url=config.kubelet_url,
        token_file=config.kubelet_token_file,
        ca_file=config.kubelet_ca_file,
        insecure_skip_verify=config.kubelet_insecure_skip_verify,
        poll_s=config.kubelet_poll_s,
        timeout_s=config.kubelet_timeout_s,
    )


def work_source_settings(config: Config) -> WorkSourceSettings:
    return WorkSourceSettings(
        rules=config.work_sources,
        discover_sockets=config.work_source_discovery,
        poll_s=config.work_source_poll_s,
        timeout_s=config.work_source_timeout_s,
        max_body_bytes=config.work_source_max_body_bytes,
        pod_job_labels=config.pod_job_labels,
    )


def read_boot_id(config: Config) -> str:
    try:
        return (config.procfs / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass
class ExportSelection:
    """Which jobs get series of their own. Admission is first come, first
    served, and sticky: a job that went to the overflow stays there, so the
    overflow counter never goes backwards."""

    cap: int
    exported: set[str] = field(default_factory=set)
    overflow: set[str] = field(default_factory=set)
    # What overflow jobs that left memory had accumulated: the aggregate keeps it.
    retired_overflow: JobTotals = NO_TOTALS

    def admit(self, job_id: str) -> None:
        if job_id in self.exported or job_id in self.overflow:
            return
        if len(self.exported) < self.cap:
            self.exported.add(job_id)
        else:
            self.overflow.add(job_id)

    def retire(self, job: JobView) -> None:
        job_id = job.ref.id
        self.exported.discard(job_id)
        if job_id in self.overflow:
            self.overflow.discard(job_id)
            self.retired_overflow = self.retired_overflow + job.totals

    def select(self, jobs: tuple[JobView, ...]) -> list[JobView]:
        """The exported jobs' views, then the overflow aggregate if there is one."""
        exported: list[JobView] = []
        overflow = self.retired_overflow
        overflow_power: dict[str, float] = {}
        overflow_processes = 0
        for job in jobs:
            job_id = job.ref.id
            if job_id in self.exported:
                exported.append(job)
            elif job_id in self.overflow:
                overflow = overflow + job.totals
                for domain, power in job.power_w.items():
                    overflow_power[domain] = overflow_power.get(domain, 0.0) + power
                overflow_processes += job.processes
        if self.overflow or self.retired_overflow.energy_j:
            exported.append(JobView(OVERFLOW_JOB, {}, overflow_power, overflow_processes, None, overflow))
        return exported


class Agent:
    def __init__(self, config: Config, sensors: SensorSet | None = None) -> None:
        self.config = config
        self.intensity = intensity.from_config(config.carbon)  # raises ConfigError
        self.carbon_now = self.intensity.at(time.time())
        self.ledger = Ledger(config.state_dir)
        self.registry = Registry(config.procfs)
        self.scanner = ProcessScanner(config.procfs)
        self.cgroup_cpu = CgroupCpuReader(config.sysfs)
        self._grouped: tuple[list[ScannedProcess], list[JobRef | None], JobProcesses] | None = None
        self._skipping: tuple[JobProcesses | None, frozenset[CgroupCounter]] = (None, frozenset())
        self._scanned_generation = -1
        self.kubelet = KubeletPoller(kubelet_settings(config)) if config.kubelet_active else None
        self.resolver = JobResolver(
            self.registry,
            config.rules,
            config.systemd_unit_exclude,
            pods=self.kubelet,
            pod_job_labels=config.pod_job_labels,
        )
        self._work_source_members: tuple[dict[str, list[int]], dict[str, str]] = ({}, {})
        self.work_sources = (
            WorkSourcePoller(
                work_source_settings(config), config.procfs, pods=self.kubelet.pods if self.kubelet else None
            )
            if config.work_sources or config.work_source_discovery or self.kubelet
            else None
        )
        self.sensor_set = sensors or build_sensors(config)
        self.boot_id = read_boot_id(config)
        self.estimators: dict[tuple[str, str], IdlePowerEstimator] = {}
        self.gpu_idle = GpuIdleTracker(configured_w=config.gpu_idle_power_w)
        self.selection = ExportSelection(config.max_exported_jobs)
        self.snapshot: Snapshot = EMPTY_SNAPSHOT
        self.ticks = 0
        self.tick_durations = DurationCounts()
        self.sensor_errors: dict[tuple[str, str], int] = {}
        self._last_mono: float | None = None
        self._last_tick_done_mono: float | None = None
        self._last_flush_mono = time.monotonic()
        self._stop = threading.Event()
        self._tick_lock = threading.Lock()
        self._resume_registrations()

    # -- start-up --------------------------------------------------------------
    def _resume_registrations(self) -> None:
        """Registered jobs come back if one of their processes still runs
        (same pid and start time); otherwise they are finished."""
        for job in self.ledger.registered_jobs():
            alive = [key for key in job.root_keys if read_process_key(self.config.procfs, key.pid) == key]
            self.registry.restore(job)
            if alive:
                self.selection.admit(job.ref.id)
            else:
                self.ledger.mark_finished(job.ref.id, self.registry.finish(job.ref.id, reason="gone after restart"))
        for job_id in self.ledger.job_ids():
            self.selection.admit(job_id)

    def _recover_downtime(self) -> None:
        """Book energy the RAPL counters show was used while the agent was down."""
        powercap = self.sensor_set.powercap
        if powercap is None:
            return
        saved = self.ledger.saved_counters()
        now = time.monotonic()
        zones = {zone.zone_id: zone for zone in powercap.zones}
        for zone_id, (raw, max_range) in powercap.counter_state().items():
            previous = saved.get(zone_id)
            zone = zones.get(zone_id)
            if previous is None or zone is None or not self.boot_id or previous.boot_id != self.boot_id:
                continue
            energy = recoverable_downtime_energy_j(
                previous.raw_uj, raw, max_range, now - previous.monotonic_s, self.config.max_zone_power_w
            )
            if energy > 0:
                self.ledger.book_recovered(zone.domain, zone.device, "rapl", energy)
                log.info("recovered %.1f J used by %s while the agent was down", energy, zone.device)

    def start_pod_metadata(self) -> None:
        """Start polling the kubelet and wait (bounded) for its first answer, so
        pods already running resolve to their ML jobs from the first tick."""
        if self.kubelet is not None:
            self.kubelet.start()
            self.kubelet.first_poll.wait(self.config.kubelet_timeout_s + 1.0)

    # -- control operations (called from the API) ----------------------------------
    def register_job(self, name: str, pids: list[int], labels: dict[str, str], owner_uid: int = 0) -> JobView:
        job = self.registry.register(name, pids, labels, owner_uid)
        self.ledger.save_registration(job, time.time())
        self.selection.admit(job.ref.id)
        return self._job(job.ref.id)

    def finish_job(self, job_id: str) -> JobView:
        """Finish a registered job, after one more sample: the partial interval
        since the last tick is the job's, not the host's."""
        registration = self.registry.get(job_id)
        since = self.seconds_since_tick()
        # At most one extra sample per FINISH_SAMPLE_GAP_S, however fast callers finish jobs.
        if (
            registration is not None
            and registration.finished_at is None
            and (since is None or since > FINISH_SAMPLE_GAP_S)
        ):
            try:
                if self.try_tick(wait_s=max(2 * self.config.interval_s, 2.0)) is None:
                    log.warning("no sample before finishing %s: the sampler is busy", job_id)
            except Exception:  # the job must still finish; the next tick books the interval
                log.exception("sample before finishing %s failed", job_id)
        job = self.registry.finish(job_id)  # raises UnknownJob
        self.ledger.mark_finished(job_id, job)
        self.ledger.flush()
        return self._job(job_id)

    def _job(self, job_id: str) -> JobView:
        view = self.ledger.job(job_id)
        if view is None:
            raise UnknownJob(job_id)
        return view

    def add_work(self, job_id: str, unit: str, count: float) -> JobView:
        record = self.ledger.add_work(job_id, unit, count)
        if record is None:
            raise UnknownJob(job_id)
        return record

    def registered(self, job_id: str) -> RegisteredJob | None:
        return self.registry.get(job_id)

    # -- the tick ------------------------------------------------------------------
    def _idle_power_w(self, reading: DeviceEnergy, utilization: float) -> float:
        if reading.idle_power_w is not None:
            return reading.idle_power_w
        estimator = self.estimators.setdefault(
            (reading.domain, reading.device), IdlePowerEstimator(prior_idle_fraction=self.config.cpu_idle_fraction)
        )
        estimator.observe(utilization, reading.power_w)
        estimate = estimator.estimate_w()
        return estimate if estimate is not None else 0.0

    def _attribute(
        self, readings: list[DeviceEnergy], scan: Scan, job_cpu_s: dict[str, float], interval_s: float
    ) -> tuple[list[DomainAttribution], dict[str, float]]:
        measured: dict[str, float] = {}
        idle_power: dict[str, float] = {}
        for reading in readings:
            if reading.domain not in ATTRIBUTED_DOMAINS or reading.domain == "gpu":
                continue
            utilization = (
                scan.node.utilization_ratio if reading.utilization_ratio is None else reading.utilization_ratio
            )
            measured[reading.domain] = measured.get(reading.domain, 0.0) + reading.energy_j
            idle_power[reading.domain] = idle_power.get(reading.domain, 0.0) + self._idle_power_w(reading, utilization)
        for domain, watts in self.config.idle_power_w.items():
            if domain in idle_power:
                idle_power[domain] = watts
        parts = [
            split_domain(domain, energy, idle_power[domain], interval_s, job_cpu_s, scan.node.busy_s)
            for domain, energy in sorted(measured.items())
        ]
        return parts, idle_power

    def _attribute_gpus(
        self,
        readings: list[DeviceEnergy],
        scan: Scan,
        jobs: list[JobRef | None],
        parts: list[DomainAttribution],
        idle_power: dict[str, float],
    ) -> dict[str, float]:
        """Append the GPU domain's split to ``parts``; return allocated-idle joules per job."""
        gpus = [r for r in readings if r.domain == "gpu"]
        if not gpus:
            return {}
        nvml = self.sensor_set.nvml
        job_of = {process.key.pid: ref.id if ref else None for process, ref in zip(scan.processes, jobs)}
        result, idle_w = self.gpu_idle.attribute(gpus, nvml.views() if nvml else {}, job_of)
        parts.append(result.total)
        idle_power["gpu"] = sum(w for w in idle_w.values() if w is not None)
        return result.allocated_idle_j

    def _group_jobs(self, scan: Scan, jobs: list[JobRef | None]) -> JobProcesses:
        """The scan by job; the scanner's steady state (the same processes and
        the same answers) reuses the last grouping, whose cgroups are no longer new."""
        last = self._grouped
        if last is not None and last[0] is scan.processes and last[1] is jobs:
            return last[2]
        groups = group_jobs(
            scan.processes, jobs, self.resolver.counters, self.resolver.enclosing_counter, scan.since_boot_ticks
        )
        self._grouped = (scan.processes, jobs, replace(groups, born=frozenset()))
        return groups

    def tick(self) -> Snapshot:
        with self._tick_lock:
            return self._tick()

    def try_tick(self, wait_s: float) -> Snapshot | None:
        """One sample, unless another tick holds the lock for ``wait_s``
        (None): a stalled sampler must not hang an API call."""
        if not self._tick_lock.acquire(timeout=wait_s):
            return None
        try:
            return self._tick()
        finally:
            self._tick_lock.release()

    def _tick(self) -> Snapshot:
        started = time.monotonic()
        # Registrations from now on may name processes this scan does not list: they are judged next tick.
        epoch = self.registry.epoch
        if self.registry.generation != self._scanned_generation:
            # New registrations name pids by their current process: read every stat once, so a pid
            # reused since the last read is seen as the new process it is.
            self._scanned_generation = self.registry.generation
            self.scanner.skip([])
        scan = self.scanner.scan()
        now_mono = time.monotonic()
        interval_s = 0.0 if self._last_mono is None else now_mono - self._last_mono
        ctx = TickContext(interval_s, scan.node.utilization_ratio, scan.node.busy_s)
        readings: list[DeviceEnergy] = []
        for sensor in self.sensor_set.sensors:
            try:
                readings.extend(sensor.sample(ctx))
            except Exception as exc:  # a sensor must never stop the agent
                log.warning("sensor %s failed: %s", sensor.name, exc)
            for status in sensor.status():
                if not status.up:
                    key = (status.sensor, status.device)
                    self.sensor_errors[key] = self.sensor_errors.get(key, 0) + 1
        readings = [r for r in readings if math.isfinite(r.energy_j) and r.energy_j >= 0]
        first_tick = self._last_mono is None
        self._last_mono = now_mono

        jobs = self.resolver.resolve(scan.processes)
        self.resolver.forget(scan.exited)
        # Registered processes not seen now, exited since the last scan or before the first one.
        finished = self.registry.forget_exited([k for k in self.registry.keys_joined_by(epoch) if k not in scan.live])
        now_unix = time.time()
        for job_id in finished:
            registration = self.registry.get(job_id)
            if registration is not None:
                self.ledger.mark_finished(job_id, registration)

        activity: dict[str, JobActivity] = {}
        # A cgroup-defined job's CPU time is its cgroup's counter; the others' is their processes'.
        groups = self._group_jobs(scan, jobs)
        refs, counts, pids = groups.refs, groups.counts, groups.pids
        cpu: dict[str, float] = {}
        inside: dict[CgroupCounter, float] = {}
        for process, job_id, enclosing in groups.per_process:
            cpu[job_id] = cpu.get(job_id, 0.0) + process.cpu_s
            if enclosing is not None:
                inside[enclosing] = inside.get(enclosing, 0.0) + process.cpu_s
        cgroups = self.cgroup_cpu.read(groups.members, groups.born, inside)
        for job_id, seconds in cgroups.job_cpu_s.items():
            if job_id in refs or self.ledger.has_job(job_id):  # the ledger books only jobs it knows
                cpu[job_id] = cpu.get(job_id, 0.0) + seconds
        for counter, counted in groups.counted.items():
            if counter not in cgroups.readable:  # no counter here (no cgroup fs, no CPU accounting)
                for process, job_id in counted:
                    cpu[job_id] = cpu.get(job_id, 0.0) + process.cpu_s
        if self._skipping[0] is not groups or self._skipping[1] != cgroups.readable:
            readable = [p for c, m in groups.counted.items() if c in cgroups.readable for p, _ in m]
            self.scanner.skip(readable + groups.host)
            self._skipping = (groups, cgroups.readable)
        info = self.resolver.info_labels  # pod and Slurm metadata for jouleward_job_info
        for job_id, ref in cgroups.ended.items():
            if job_id not in refs and self.ledger.has_job(job_id):
                activity[job_id] = JobActivity(ref, cpu.get(job_id, 0.0), 0)
        for job_id, ref in refs.items():
            activity[job_id] = JobActivity(ref, cpu.get(job_id, 0.0), counts[job_id])
            if not self.ledger.has_job(job_id):
                registration = self.registry.get(job_id)
                self.ledger.ensure_job(ref, now_unix, labels=info.get(job_id), registration=registration)
                self.selection.admit(job_id)
            else:
                self.ledger.update_identity(ref, now_unix, labels=info.get(job_id))
        if self.work_sources is not None:
            # The poller finds and reads the engines' endpoints on its own thread; here only two swaps,
            # and the members are handed over again only when they changed.
            names = {job_id: refs[job_id].name for job_id in pids}
            if (pids, names) != self._work_source_members:
                self._work_source_members = (pids, names)
                self.work_sources.update_jobs(
                    {job_id: JobMembers(refs[job_id].name, tuple(p)) for job_id, p in pids.items()}
                )
            for job_id, units in self.work_sources.drain().items():
                for unit, count in units.items():
                    self.ledger.add_work(job_id, unit, count)  # a job already gone from memory drops it

        if first_tick:
            self._recover_downtime()
            parts: list[DomainAttribution] = []
            idle_power: dict[str, float] = {}
        else:
            parts, idle_power = self._attribute(readings, scan, cpu, interval_s)
            gpu_idle_j = self._attribute_gpus(readings, scan, jobs, parts, idle_power)
            self.ledger.book_tick(now_unix, readings, parts, activity, interval_s, gpu_idle_j)
            self._charge_emissions(now_unix, interval_s, readings, jobs_energy_j(parts))
        self.ticks += 1
        self._maybe_flush(now_mono)
        self._retire(now_unix)
        self.snapshot = self._build_snapshot(
            now_unix, interval_s, scan, idle_power, len(scan.processes), time.monotonic() - started
        )
        self._last_tick_done_mono = time.monotonic()
        return self.snapshot

    def seconds_since_tick(self) -> float | None:
        """Seconds since the last tick completed; None before the first."""
        done = self._last_tick_done_mono
        return None if done is None else time.monotonic() - done

    def _charge_emissions(
        self, now_unix: float, interval_s: float, readings: list[DeviceEnergy], jobs_j: dict[str, float]
    ) -> None:
        """Charge this tick's energy at the intensity in force during the tick."""
        self.carbon_now = self.intensity.at(emissions.interval_midpoint_s(now_unix, interval_s))
        # Platform and board channels overlap the attributed domains: counting them would double the node.
        node_j = sum(r.energy_j for r in readings if r.domain in ATTRIBUTED_DOMAINS)
        g_per_kwh, pue = self.carbon_now.grams_per_kwh, self.config.carbon.pue
        self.ledger.book_emissions(
            emissions.tick_grams(jobs_j, g_per_kwh, pue), emissions.grams(node_j, g_per_kwh, pue)
        )

    def _maybe_flush(self, now_mono: float, force: bool = False) -> None:
        if force or now_mono - self._last_flush_mono >= self.config.flush_interval_s:
            counters = self.sensor_set.powercap.counter_state() if self.sensor_set.powercap else {}
            if not self.ledger.flush(counters, self.boot_id, time.monotonic()):
                log.warning("ledger flush failed: %s", self.ledger.last_flush_error)
            self._last_flush_mono = now_mono

    def _retire(self, now_unix: float) -> None:
        cutoff = now_unix - self.config.finished_job_retention_s
        for job in self.ledger.finished_before(cutoff):
            self.selection.retire(job)
        for job_id in self.ledger.evict_finished(cutoff):
            self.registry.drop(job_id)

    def _build_snapshot(
        self,
        now_unix: float,
        interval_s: float,
        scan: Scan,
        idle_power: dict[str, float],
        processes: int,
        duration_s: float,
    ) -> Snapshot:
        totals = self.ledger.read()
        devices = totals.devices
        running = sum(1 for job in totals.jobs if job.finished_at is None)
        finished = len(totals.jobs) - running
        exported = self.selection.select(totals.jobs)
        idle, unattributed = totals.idle_j, totals.unattributed_j
        flush_unix, flush_errors = totals.last_flush_unix, totals.flush_errors
        node_g = totals.node_emissions_g
        statuses = tuple(status for sensor in self.sensor_set.sensors for status in sensor.status())
        self.tick_durations = self.tick_durations.observe(duration_s)
        health = Health(
            self.ticks,
            duration_s,
            self.tick_durations,
            statuses,
            dict(self.sensor_errors),
            processes,
            running,
            finished,
            flush_unix,
            flush_errors,
            kubelet=self.kubelet.health() if self.kubelet else None,
            work_sources=self.work_sources.health() if self.work_sources else (),
        )
        nvml = self.sensor_set.nvml
        gpus = tuple(sorted(nvml.views().values(), key=lambda v: v.index)) if nvml else ()
        now = self.carbon_now
        carbon = CarbonView(
            now.grams_per_kwh, now.zone, now.source, self.config.carbon.pue, node_g, self.intensity.errors_total
        )
        return Snapshot(
            now_unix,
            interval_s,
            scan.node.utilization_ratio,
            devices,
            idle,
            unattributed,
            idle_power,
            tuple(exported),
            health,
            carbon=carbon,
            gpus=gpus,
            served_work=self.work_sources.served() if self.work_sources else {},
        )

    # -- the loop ------------------------------------------------------------------
    def run(self) -> None:
        """Tick every ``interval_s`` on the monotonic clock until ``stop``."""
        self.start_pod_metadata()
        if self.work_sources is not None:
            self.work_sources.start()
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("tick failed")
            next_at += self.config.interval_s
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (suspend, overload): skip, do not burst
                next_at = time.monotonic()
                delay = 0
            self._stop.wait(delay)

    def stop(self) -> None:
        self._stop.set()
        if self.kubelet is not None:
            self.kubelet.stop()
        if self.work_sources is not None:
            self.work_sources.stop()

    def close(self) -> None:
        """Final flush; safe to call once the loop has stopped."""
        with self._tick_lock:
            self._maybe_flush(time.monotonic(), force=True)
            for sensor in self.sensor_set.sensors:
                sensor.close()
            self.intensity.close()
            self.ledger.close()


__all__ = ["Agent", "UnknownJob"]
