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
from agent.attribution.gpu import GpuAttribution, GpuIdleTracker
from agent.carbon import emissions, intensity
from agent.config import Config
from agent.ledger.totals import JobActivity, Ledger, LedgerBusy
from agent.model import (
    ATTRIBUTED_DOMAINS,
    DeviceEnergy,
    DomainAttribution,
    GpuAllocation,
    JobRef,
    JobView,
    TickContext,
)
from agent.pipeline.snapshot import EMPTY_SNAPSHOT, CarbonView, DurationCounts, GpuAllocationView, Health, Snapshot
from agent.sensors import SensorSet, build_sensors
from agent.sensors.counters import recoverable_downtime_energy_j
from agent.workloads.allocation import AllocationPoller, SlurmMapReader
from agent.workloads.cgroupcpu import CgroupCounter, CgroupCpuReader, JobProcesses, group_jobs
from agent.workloads.kubelet import KubeletHealth, KubeletPoller, KubeletSettings
from agent.workloads.podresources import PodResourcesReader
from agent.workloads.procfs import ProcessScanner, Scan, ScannedProcess
from agent.workloads.registry import RegisteredJob, Registry, UnknownJob, read_process_key
from agent.workloads.resolve import JobResolver
from agent.workloads.worksources import JobMembers, WorkSourcePoller, WorkSourceSettings

log = logging.getLogger("jouleward")
# A finish samples once more unless a tick completed within this share of the
# interval (at most 0.5 s): the job's last partial interval is the job's, and
# however fast callers finish jobs, extra samples stay a few per interval.
FINISH_SAMPLE_GAP_SHARE = 0.25
FINISH_SAMPLE_GAP_MAX_S = 0.5


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


def allocation_pollers(config: Config, kubelet: KubeletPoller | None) -> list[AllocationPoller]:
    """The GPU allocation sources configured: pod-resources, Slurm's mapping directory."""
    pollers: list[AllocationPoller] = []
    if config.gpu_enabled and config.pod_resources_active:
        reader = PodResourcesReader(
            config.pod_resources_socket,
            config.pod_resources_timeout_s,
            kubelet.pods if kubelet is not None else None,
            config.pod_job_labels,
        )
        pollers.append(AllocationPoller("kubelet", reader, config.pod_resources_poll_s, config.pod_resources_timeout_s))
    if config.gpu_enabled and config.slurm_gpu_job_map_dir is not None:
        slurm = SlurmMapReader(config.slurm_gpu_job_map_dir)
        pollers.append(AllocationPoller("slurm", slurm, config.slurm_gpu_job_map_poll_s, 1.0))
    return pollers


@dataclass
class GpuAllocationTotals:
    """What the allocation left to the node, summed since start (per GPU), and the last tick's allocation."""

    unallocated_idle_j: dict[str, float] = field(default_factory=dict)
    unallocated_use_j: dict[str, float] = field(default_factory=dict)
    instance_energy_j: dict[tuple[str, int, str, str], float] = field(default_factory=dict)
    jobs_per_gpu: dict[str, int] = field(default_factory=dict)
    devices_per_job: dict[str, int] = field(default_factory=dict)
    unallocated_users: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unseen_devices: int = 0

    def add(self, result: GpuAttribution) -> None:
        self.jobs_per_gpu = {}
        self.unallocated_users = {}
        for split in result.devices:
            self.jobs_per_gpu[split.device] = len(split.allocated_jobs)
            if split.unallocated_idle_j:
                grown = self.unallocated_idle_j.get(split.device, 0.0) + split.unallocated_idle_j
                self.unallocated_idle_j[split.device] = grown
            if split.unallocated_use_j:
                used = sum(split.unallocated_use_j.values())
                self.unallocated_use_j[split.device] = self.unallocated_use_j.get(split.device, 0.0) + used
                self.unallocated_users[split.device] = tuple(sorted(split.unallocated_use_j))
            for instance in split.instances:
                key = (split.device, instance.gpu_instance_id, instance.mig_uuid, instance.source)
                self.instance_energy_j[key] = self.instance_energy_j.get(key, 0.0) + instance.energy_j
        self.devices_per_job = dict(result.allocated_devices)
        self.unseen_devices = result.unmapped_allocations


def read_boot_id(config: Config) -> str:
    try:
        return (config.procfs / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class Agent:
    def __init__(self, config: Config, sensors: SensorSet | None = None) -> None:
        self.config = config
        self.intensity = intensity.from_config(config.carbon)  # raises ConfigError
        self.carbon_now = self.intensity.at(time.time())
        self.ledger = Ledger(
            config.state_dir,
            max_exported_jobs=config.max_exported_jobs,
            retain_finished_s=config.finished_job_retention_s,
            prune_finished_after_s=config.ledger_job_retention_s,
        )
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
        self.gpu_allocations = allocation_pollers(config, self.kubelet)
        self.gpu_allocation_totals = GpuAllocationTotals()
        self.snapshot: Snapshot = EMPTY_SNAPSHOT
        self.ticks = 0
        self.tick_durations = DurationCounts()
        self.sensor_errors: dict[tuple[str, str], int] = {}
        self._carbon_errors_before = 0
        self._kubelet_errors_before = 0
        self._restore_agent_counters()
        self._published = (self.tick_durations, self._carbon_errors_before, self._kubelet_errors_before)
        self._members_version = -1
        self._last_mono: float | None = None
        self._last_tick_done_mono: float | None = None
        self._last_flush_mono = time.monotonic()
        self._scan_epoch = 0
        self._idle_power: dict[str, float] = {}
        self._stop = threading.Event()
        self._tick_lock = threading.Lock()
        self._resume_registrations()

    # -- start-up --------------------------------------------------------------
    def _resume_registrations(self) -> None:
        """Registered jobs come back while one of their processes still runs
        (same pid and start time): a root, or a descendant the job had adopted
        before the restart. The others are finished."""
        for job, members in self.ledger.registered_jobs():
            alive = tuple(key for key in members if read_process_key(self.config.procfs, key.pid) == key)
            self.registry.restore(job, members=alive)
            if not alive:
                self.ledger.mark_finished(job.ref.id, self.registry.finish(job.ref.id, reason="gone after restart"))

    def _restore_agent_counters(self) -> None:
        """The agent's own counters continue across restarts, like the totals."""
        saved = self.ledger.agent_counters
        try:
            self.ticks = int(saved.get("ticks", 0))  # type: ignore[call-overload]
            durations = saved.get("tick_durations")
            if isinstance(durations, dict) and len(durations.get("counts", ())) == len(DurationCounts().counts):
                self.tick_durations = DurationCounts(
                    tuple(int(c) for c in durations["counts"]), float(durations.get("sum_s", 0.0))
                )
            errors = saved.get("sensor_errors")
            if isinstance(errors, list):
                self.sensor_errors = {(str(sensor), str(device)): int(n) for sensor, device, n in errors}
            self.ledger.flush_errors = int(saved.get("ledger_errors", 0))  # type: ignore[call-overload]
            self._carbon_errors_before = int(saved.get("carbon_errors", 0))  # type: ignore[call-overload]
            self._kubelet_errors_before = int(saved.get("kubelet_errors", 0))  # type: ignore[call-overload]
            gpu = saved.get("gpu_allocation")
            if isinstance(gpu, dict):
                totals = self.gpu_allocation_totals
                totals.unallocated_idle_j = {str(k): float(v) for k, v in gpu.get("unallocated_idle_j", {}).items()}
                totals.unallocated_use_j = {str(k): float(v) for k, v in gpu.get("unallocated_use_j", {}).items()}
                totals.instance_energy_j = {
                    (str(device), int(gi), str(uuid), str(source)): float(j)
                    for device, gi, uuid, source, j in gpu.get("instance_energy_j", [])
                }
        except (TypeError, ValueError):
            log.warning("the agent's own counters in the ledger are unreadable; they start again from zero")

    def _agent_counters(self) -> dict[str, object]:
        """The agent's own counters as the commit stores them; the snapshot
        built after it shows these same values, so none is exported ahead of
        the file (this tick's duration joins the histogram at the next commit)."""
        kubelet_errors = self._kubelet_errors_before + (self.kubelet.health().errors_total if self.kubelet else 0)
        self._published = (self.tick_durations, self._carbon_errors(), kubelet_errors)
        return {
            "ticks": self.ticks,
            "tick_durations": {"counts": list(self.tick_durations.counts), "sum_s": self.tick_durations.sum_s},
            "sensor_errors": [[sensor, device, n] for (sensor, device), n in sorted(self.sensor_errors.items())],
            "ledger_errors": self.ledger.flush_errors,
            "carbon_errors": self._carbon_errors(),
            "kubelet_errors": kubelet_errors,
            "gpu_allocation": {
                "unallocated_idle_j": self.gpu_allocation_totals.unallocated_idle_j,
                "unallocated_use_j": self.gpu_allocation_totals.unallocated_use_j,
                "instance_energy_j": [
                    [*key, j] for key, j in sorted(self.gpu_allocation_totals.instance_energy_j.items())
                ],
            },
        }

    def _carbon_errors(self) -> int:
        return self._carbon_errors_before + self.intensity.errors_total

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
        for poller in self.gpu_allocations:
            poller.start()
            poller.first_poll.wait(poller.timeout_s + 1.0)

    # -- control operations (called from the API) ----------------------------------
    def register_job(self, name: str, pids: list[int], labels: dict[str, str], owner_uid: int = 0) -> JobView:
        """Register and write the registration through; LedgerBusy (and no
        registration at all) when the ledger cannot be written."""
        job = self.registry.register(name, pids, labels, owner_uid)
        try:
            view = self.ledger.save_registration(job, time.time())
        except LedgerBusy:
            self.registry.unregister(job.ref.id)
            raise
        self.registry.confirm(job)
        self.scanner.take_baselines(job.root_keys)
        return view

    def finish_job(self, job_id: str) -> JobView:
        """Finish a registered job, after one more sample: the partial interval
        since the last tick is the job's, not the host's."""
        registration = self.registry.get(job_id)
        since = self.seconds_since_tick()
        gap_s = min(FINISH_SAMPLE_GAP_MAX_S, FINISH_SAMPLE_GAP_SHARE * self.config.interval_s)
        if registration is not None and registration.finished_at is None and (since is None or since > gap_s):
            try:
                if self.try_tick(wait_s=max(2 * self.config.interval_s, 2.0)) is None:
                    log.warning("no sample before finishing %s: the sampler is busy", job_id)
            except Exception:  # the job must still finish; the next tick books the interval
                log.exception("sample before finishing %s failed", job_id)
        registration = self.registry.get(job_id)  # the sample may have seen its last process exit
        if registration is None:
            raise UnknownJob(job_id)
        if registration.finished_at is not None:
            return self._job(job_id)
        finished = replace(registration, finished_at=time.time(), finish_reason="finished")
        view = self.ledger.save_registration(finished, time.time())  # raises LedgerBusy, nothing changed
        self.registry.finish(job_id, at=finished)
        return view

    def _job(self, job_id: str) -> JobView:
        view = self.ledger.job(job_id)
        if view is None:
            raise UnknownJob(job_id)
        return view

    def add_work(self, job_id: str, unit: str, count: float) -> JobView:
        record = self.ledger.add_work(job_id, unit, count)  # raises LedgerBusy
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
        activity: dict[str, JobActivity],
    ) -> dict[str, float]:
        """Append the GPU domain's split to ``parts``; return allocated-idle joules per job.

        A job the scheduler allocated a GPU joins ``activity`` (no process, no
        CPU time) when none of its processes runs here this tick: it stays a
        running job, exported, while its allocation is charged."""
        gpus = [r for r in readings if r.domain == "gpu"]
        if not gpus:
            return {}
        nvml = self.sensor_set.nvml
        job_of = {process.key.pid: ref.id if ref else None for process, ref in zip(scan.processes, jobs)}
        allocations = self._gpu_allocations()
        if allocations:
            # A job allocated a GPU may have no process on the node this tick
            # (a crashed trainer waiting on its restart policy): it pays all the same.
            now_unix = time.time()
            for allocation in allocations:
                job_id = allocation.job.id
                if not self.ledger.has_job(job_id):
                    self.ledger.ensure_job(allocation.job, now_unix)
                if job_id not in activity:
                    activity[job_id] = JobActivity(allocation.job, 0.0, 0)
        result, idle_w = self.gpu_idle.attribute(gpus, nvml.views() if nvml else {}, job_of, allocations)
        parts.append(result.total)
        idle_power["gpu"] = sum(w for w in idle_w.values() if w is not None)
        self.gpu_allocation_totals.add(result)
        return result.allocated_idle_j

    def _gpu_allocations(self) -> tuple[GpuAllocation, ...] | None:
        """The allocations of every source that has answered at least once
        (the last known one while a source is down); None when none has, so
        GPUs are charged by their contexts as without a scheduler."""
        answered = [p for p in self.gpu_allocations if p.health().last_success_unix_s > 0]
        if not answered:
            return None
        return tuple(a for poller in answered for a in poller.allocations())

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
        self._scan_epoch = self.registry.epoch
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
        try:
            now_unix = self._attribute_and_book(scan, readings, interval_s, first_tick)
        except Exception:
            # The sensors' baselines have moved on: book what they measured to
            # the node, or that interval's energy would be lost for good.
            if not first_tick:
                self.ledger.book_unattributed(readings)
            self._commit(now_mono)
            raise
        self.ticks += 1
        durable = self._commit(now_mono)
        self._retire(now_unix)
        snapshot = self._build_snapshot(
            now_unix, interval_s, scan, self._idle_power, len(scan.processes), time.monotonic() - started
        )
        if not durable and self.snapshot is not EMPTY_SNAPSHOT:
            snapshot = self._frozen(snapshot)
        self.snapshot = snapshot
        self.tick_durations = self.tick_durations.observe(time.monotonic() - started)
        self._last_tick_done_mono = time.monotonic()
        return self.snapshot

    def _frozen(self, snapshot: Snapshot) -> Snapshot:
        """The tick's snapshot with the totals of the last durable one: while
        the ledger cannot be written, exported counters wait (nothing is lost;
        memory keeps counting and the next commit catches up), so a crash
        meanwhile never brings them back below what was scraped."""
        last = self.snapshot
        return replace(
            snapshot,
            devices=last.devices,
            idle_j=last.idle_j,
            unattributed_j=last.unattributed_j,
            jobs=last.jobs,
            carbon=replace(snapshot.carbon, node_emissions_g=last.carbon.node_emissions_g),
        )

    def _attribute_and_book(
        self, scan: Scan, readings: list[DeviceEnergy], interval_s: float, first_tick: bool
    ) -> float:
        """Resolve the scan's processes to jobs, split the readings, book them; returns the tick's Unix time."""
        epoch = self._scan_epoch
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
            # A process registered since this tick's scan is still a host process in this
            # grouping; skipping it would lose its first interval as the job's.
            host = [p for p in groups.host if self.registry.job_of(p.key) is None]
            self.scanner.skip(readable + host)
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
                    self.ledger.book_work(job_id, unit, count)
        if self.registry.members_version != self._members_version:
            self._members_version = self.registry.members_version
            for job_id, members in self.registry.members().items():
                self.ledger.set_members(job_id, members)

        if first_tick:
            self._recover_downtime()
            self._idle_power = {}
        else:
            parts, idle_power = self._attribute(readings, scan, cpu, interval_s)
            gpu_idle_j = self._attribute_gpus(readings, scan, jobs, parts, idle_power, activity)
            self.ledger.book_tick(now_unix, readings, parts, activity, interval_s, gpu_idle_j)
            self._charge_emissions(now_unix, interval_s, readings, jobs_energy_j(parts))
            self._idle_power = idle_power
        return now_unix

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

    def _kubelet_health(self, errors_total: int) -> KubeletHealth | None:
        if self.kubelet is None:
            return None
        return replace(self.kubelet.health(), errors_total=errors_total)

    def _commit(self, now_mono: float, full: bool = False) -> bool:
        """Commit the tick's totals (every tick); rows that only say when a job
        was last seen go with the full commit every ``flush_interval_s``."""
        full = full or now_mono - self._last_flush_mono >= self.config.flush_interval_s
        counters = self.sensor_set.powercap.counter_state() if self.sensor_set.powercap else {}
        ok = self.ledger.commit(counters, self.boot_id, time.monotonic(), self._agent_counters(), full=full)
        if not ok:
            log.warning("ledger write failed: %s", self.ledger.last_flush_error)
        elif full:
            self._last_flush_mono = now_mono
        return ok

    def _retire(self, now_unix: float) -> None:
        for job_id in self.ledger.evict_finished(now_unix - self.config.finished_job_retention_s):
            self.registry.drop(job_id)
        self.ledger.prune(now_unix)

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
        exported = totals.exposed
        idle, unattributed = totals.idle_j, totals.unattributed_j
        flush_unix, flush_errors = totals.last_flush_unix, totals.flush_errors
        node_g = totals.node_emissions_g
        statuses = tuple(status for sensor in self.sensor_set.sensors for status in sensor.status())
        durations, carbon_errors, kubelet_errors = self._published
        health = Health(
            self.ticks,
            duration_s,
            durations,
            statuses,
            dict(self.sensor_errors),
            processes,
            running,
            finished,
            flush_unix,
            flush_errors,
            kubelet=self._kubelet_health(kubelet_errors),
            work_sources=self.work_sources.health() if self.work_sources else (),
        )
        nvml = self.sensor_set.nvml
        gpus = tuple(sorted(nvml.views().values(), key=lambda v: v.index)) if nvml else ()
        now = self.carbon_now
        carbon = CarbonView(now.grams_per_kwh, now.zone, now.source, self.config.carbon.pue, node_g, carbon_errors)
        return Snapshot(
            now_unix,
            interval_s,
            scan.node.utilization_ratio,
            devices,
            idle,
            unattributed,
            idle_power,
            exported,
            health,
            carbon=carbon,
            gpus=gpus,
            served_work=self.work_sources.served() if self.work_sources else {},
            gpu_allocation=self._gpu_allocation_view(),
        )

    def _gpu_allocation_view(self) -> GpuAllocationView:
        totals = self.gpu_allocation_totals
        return GpuAllocationView(
            sources=tuple(poller.health() for poller in self.gpu_allocations),
            jobs_per_gpu=dict(totals.jobs_per_gpu),
            devices_per_job=dict(totals.devices_per_job),
            unallocated_idle_j=dict(totals.unallocated_idle_j),
            unallocated_use_j=dict(totals.unallocated_use_j),
            unallocated_users=dict(totals.unallocated_users),
            unseen_devices=totals.unseen_devices,
            instance_energy_j=dict(totals.instance_energy_j),
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
        for poller in self.gpu_allocations:
            poller.stop()
        if self.work_sources is not None:
            self.work_sources.stop()

    def close(self) -> None:
        """Final flush; safe to call once the loop has stopped."""
        with self._tick_lock:
            self._commit(time.monotonic(), full=True)
            for sensor in self.sensor_set.sensors:
                sensor.close()
            self.intensity.close()
            self.scanner.close()
            self.ledger.close()


__all__ = ["Agent", "UnknownJob"]
