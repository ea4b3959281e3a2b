"""Prometheus exposition over the latest snapshot.

The collector only reads the snapshot the sampler published: a scrape never
triggers a sample, and scrapes between two ticks share one rendering.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from agent import __version__
from agent.pipeline.snapshot import EMPTY_SNAPSHOT, JobView, Snapshot
from exporters.gpu import gpu_families
from exporters.jobs import JOB_LABELS, ExpositionFormat, JobFamiliesWriter
from exporters.jobs import safe as _safe

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
_OPENMETRICS_EOF = b"# EOF\n"


def job_label_values(job: JobView) -> list[str]:
    return [job.ref.id, job.ref.name, job.ref.kind, job.ref.namespace]


class SnapshotCollector:
    """Every family but the per-job ones (``exporters.jobs`` writes those).
    ``node`` is the node's name (NODE_NAME, else the host name). With
    ``created`` the per-job counters carry their job's start time as
    ``_created`` (OpenMetrics only: the classic text format has no place for
    it and would turn it into extra gauge series)."""

    def __init__(
        self,
        get_snapshot: Callable[[], Snapshot],
        extra: list[Callable[[Snapshot], Iterator[Metric]]] | None = None,
        node: str = "",
        hostname: str = "",
        created: bool = False,
    ) -> None:
        self._get_snapshot = get_snapshot
        self._extra = extra or []
        self._node_name = node
        self._hostname = hostname or node
        self._created = created

    def collect(self) -> Iterator[Metric]:
        snap = self._get_snapshot()
        node = GaugeMetricFamily("jouleward_node_info", "The node this agent measures; 1.", labels=["node", "hostname"])
        node.add_metric([self._node_name, self._hostname], 1.0)
        yield node
        yield from self._node(snap)
        yield from self._health(snap)
        yield from self._carbon(snap)
        yield from self._work_sources(snap)
        yield from gpu_families(snap, self._node_name, self._created)
        for extra in self._extra:
            yield from extra(snap)

    def _node(self, snap: Snapshot) -> Iterator[Metric]:
        energy = CounterMetricFamily(
            "jouleward_node_energy_joules", "Energy the device used, cumulative.", labels=["domain", "device", "source"]
        )
        power = GaugeMetricFamily(
            "jouleward_node_power_watts",
            "Average device power over the last tick.",
            labels=["domain", "device", "source"],
        )
        for device in snap.devices:
            labels = [device.domain, device.device, device.source]
            energy.add_metric(labels, _safe(device.energy_j))
            power.add_metric(labels, _safe(device.power_w))
        yield energy
        yield power
        yield GaugeMetricFamily(
            "jouleward_node_cpu_utilization_ratio",
            "Busy share of all CPUs over the last tick.",
            value=_safe(snap.cpu_utilization_ratio),
        )
        domains = sorted(set(snap.idle_j) | set(snap.unattributed_j))
        idle = CounterMetricFamily(
            "jouleward_idle_energy_joules", "Static energy not charged to any job.", labels=["domain"]
        )
        unattributed = CounterMetricFamily(
            "jouleward_unattributed_energy_joules",
            "Active energy of host processes and the kernel, and energy recovered after a restart.",
            labels=["domain"],
        )
        for domain in domains:
            idle.add_metric([domain], _safe(snap.idle_j.get(domain, 0.0)))
            unattributed.add_metric([domain], _safe(snap.unattributed_j.get(domain, 0.0)))
        yield idle
        yield unattributed
        idle_power = GaugeMetricFamily(
            "jouleward_idle_power_watts",
            "Static power in force per domain (configured or estimated).",
            labels=["domain"],
        )
        for domain, watts in sorted(snap.idle_power_w.items()):
            idle_power.add_metric([domain], _safe(watts))
        yield idle_power

    def _health(self, snap: Snapshot) -> Iterator[Metric]:
        health = snap.health
        build = GaugeMetricFamily("jouleward_build_info", "Agent version.", labels=["version", "python"])
        build.add_metric([__version__, platform.python_version()], 1.0)
        yield build
        cumulative, running = [], 0
        for bound, count in health.tick_durations.buckets():
            running += count
            cumulative.append((bound, running))
        yield HistogramMetricFamily(
            "jouleward_sample_duration_seconds",
            "Wall time of one sampling tick.",
            buckets=cumulative,
            sum_value=health.tick_durations.sum_s,
        )
        yield CounterMetricFamily("jouleward_ticks", "Sampling ticks completed.", value=health.ticks)
        up = GaugeMetricFamily(
            "jouleward_sensor_up", "1 when the device read cleanly on the last tick.", labels=["sensor", "device"]
        )
        seen = set()
        for status in health.sensors:
            key = (status.sensor, status.device)
            if key not in seen:
                seen.add(key)
                up.add_metric(list(key), 1.0 if status.up else 0.0)
        yield up
        errors = CounterMetricFamily("jouleward_sensor_errors", "Failed device reads.", labels=["sensor", "device"])
        for key in sorted(seen | set(health.sensor_errors)):
            errors.add_metric(list(key), float(health.sensor_errors.get(key, 0)))
        yield errors
        yield GaugeMetricFamily("jouleward_processes", "Processes seen in the last scan.", value=health.processes)
        jobs = GaugeMetricFamily("jouleward_jobs", "Jobs known to the agent.", labels=["state"])
        jobs.add_metric(["running"], float(health.jobs_running))
        jobs.add_metric(["finished"], float(health.jobs_finished))
        yield jobs
        if health.ledger_flush_unix is not None:
            yield GaugeMetricFamily(
                "jouleward_ledger_flush_timestamp_seconds",
                "Unix time of the last durable flush.",
                value=health.ledger_flush_unix,
            )
        yield CounterMetricFamily("jouleward_ledger_errors", "Failed ledger flushes.", value=health.ledger_errors)
        kubelet = health.kubelet
        if kubelet is not None:
            yield GaugeMetricFamily(
                "jouleward_kubelet_up",
                "1 when the last poll of the kubelet's /pods succeeded.",
                value=1.0 if kubelet.up else 0.0,
            )
            yield GaugeMetricFamily(
                "jouleward_kubelet_metadata_stale",
                "1 when pod metadata may be out of date.",
                value=1.0 if kubelet.stale else 0.0,
            )
            yield CounterMetricFamily("jouleward_kubelet_errors", "Failed kubelet polls.", value=kubelet.errors_total)
            yield GaugeMetricFamily(
                "jouleward_kubelet_last_success_timestamp_seconds",
                "Unix time of the last successful kubelet poll (0 before the first).",
                value=_safe(kubelet.last_success_unix_s),
            )

    def _carbon(self, snap: Snapshot) -> Iterator[Metric]:
        carbon = snap.carbon
        yield CounterMetricFamily(
            "jouleward_node_emissions_grams",
            "Emissions of the node's CPU, DRAM and GPU energy, gCO2eq, PUE included.",
            value=_safe(carbon.node_emissions_g),
        )
        if carbon.source:
            intensity = GaugeMetricFamily(
                "jouleward_grid_carbon_intensity_grams_per_kwh",
                "Grid carbon intensity in force over the last tick.",
                labels=["zone", "source"],
            )
            intensity.add_metric([carbon.zone, carbon.source], _safe(carbon.grams_per_kwh))
            yield intensity
        yield GaugeMetricFamily(
            "jouleward_pue", "Power usage effectiveness applied to emissions.", value=_safe(carbon.pue)
        )
        yield CounterMetricFamily(
            "jouleward_carbon_intensity_errors",
            "Failed polls of the carbon intensity provider.",
            value=float(carbon.provider_errors),
        )

    def _work_sources(self, snap: Snapshot) -> Iterator[Metric]:
        sources = snap.health.work_sources
        if not sources and not snap.served_work:
            return
        labels = ["job_id", "engine", "origin", "url"]
        up = GaugeMetricFamily(
            "jouleward_work_source_up", "1 when the last scrape of the engine's metrics succeeded.", labels=labels
        )
        stale = GaugeMetricFamily(
            "jouleward_work_source_stale",
            "1 when the engine's work counters may be out of date (last scrape failed or overdue).",
            labels=labels,
        )
        errors = CounterMetricFamily(
            "jouleward_work_source_errors", "Failed scrapes of the engine's metrics.", labels=labels
        )
        for source in sources:
            values = [source.job_id, source.engine, source.origin, source.url]
            up.add_metric(values, 1.0 if source.up else 0.0)
            stale.add_metric(values, 1.0 if source.stale else 0.0)
            errors.add_metric(values, float(source.errors_total))
        yield up
        yield stale
        yield errors
        served = CounterMetricFamily(
            "jouleward_job_served_work_units",
            "Work a serving engine counted for the job since the agent started, per served model.",
            labels=[*JOB_LABELS, "model", "unit"],
        )
        for job in snap.jobs:
            for (unit, model), count in sorted(snap.served_work.get(job.ref.id, {}).items()):
                served.add_metric([*job_label_values(job), model, unit], _safe(count))
        yield served


def make_registry(collector: SnapshotCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    # The agent's own CPU, memory and open files, for the node dashboard.
    ProcessCollector(registry=registry)
    return registry


class MetricsRenderer:
    """The whole ``/metrics`` body of a snapshot in one format: the registry's
    families through prometheus-client's encoder, then the per-job families
    from their own writer (before OpenMetrics' closing ``# EOF``)."""

    def __init__(
        self,
        get_snapshot: Callable[[], Snapshot],
        fmt: ExpositionFormat,
        extra: list[Callable[[Snapshot], Iterator[Metric]]] | None = None,
        node: str = "",
        hostname: str = "",
    ) -> None:
        self.fmt = fmt
        self._get_snapshot = get_snapshot
        openmetrics = fmt is ExpositionFormat.OPENMETRICS
        self._registry = make_registry(SnapshotCollector(get_snapshot, extra, node, hostname, created=openmetrics))
        self._encoder = generate_openmetrics if openmetrics else generate_latest
        self._jobs = JobFamiliesWriter(fmt)

    def render(self) -> bytes:
        body = self._encoder(self._registry)
        jobs = self._jobs.render(self._get_snapshot())
        if self.fmt is ExpositionFormat.OPENMETRICS:
            return b"".join((body.removesuffix(_OPENMETRICS_EOF), jobs, _OPENMETRICS_EOF))
        return body + jobs


def render_snapshot(snapshot: Snapshot, fmt: ExpositionFormat = ExpositionFormat.TEXT, node: str = "") -> bytes:
    """One snapshot's ``/metrics`` body (for reports, tests and benchmarks)."""
    return MetricsRenderer(lambda: snapshot, fmt, node=node).render()


class RenderCache:
    """One rendering per snapshot and format: every scrape between two ticks
    gets the same bytes, and concurrent scrapes of a new snapshot wait for one
    rendering instead of each doing their own. The format follows the
    scraper's Accept header: OpenMetrics (with ``_created``) when asked for,
    else the classic text format."""

    def __init__(
        self,
        get_snapshot: Callable[[], Snapshot],
        extra: list[Callable[[Snapshot], Iterator[Metric]]] | None = None,
        node: str = "",
        hostname: str = "",
    ) -> None:
        self._get_snapshot = get_snapshot
        self._lock = threading.Lock()
        self._snapshot: Snapshot = EMPTY_SNAPSHOT
        self._rendered: dict[ExpositionFormat, bytes] = {}
        self._expositions = {
            fmt: MetricsRenderer(lambda: self._snapshot, fmt, extra, node, hostname) for fmt in ExpositionFormat
        }

    def render(self) -> bytes:
        """The classic text format."""
        return self.negotiate(None)[0]

    def negotiate(self, accept: str | None) -> tuple[bytes, str]:
        """(body, content type) for a scrape sending this Accept header."""
        # Always OpenMetrics 1.0 or the classic 0.0.4 format, whatever version was asked for:
        # every name is a legacy one, so no escaping scheme changes a byte.
        if choose_encoder(accept or "")[1].startswith("application/openmetrics-text"):
            fmt, content_type = ExpositionFormat.OPENMETRICS, OPENMETRICS_CONTENT_TYPE
        else:
            fmt, content_type = ExpositionFormat.TEXT, TEXT_CONTENT_TYPE
        snap = self._get_snapshot()
        with self._lock:
            if snap is not self._snapshot:
                self._snapshot = snap
                self._rendered = {}
            body = self._rendered.get(fmt)
            if body is None:
                body = self._rendered[fmt] = self._expositions[fmt].render()
            return body, content_type
