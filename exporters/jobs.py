"""The per-job metric families, written straight to exposition text.

With hundreds of jobs these are nearly all of ``/metrics`` (a dozen samples
per job), and prometheus-client formats every sample on its own: it sorts
and escapes the same four job labels a dozen times per job. Here a job's
label string is escaped once and kept while the job's identity stays the
same, and each sample is one string format. The output is byte for byte
what prometheus-client's encoders write for the same families, in the
classic text format (0.0.4) and in OpenMetrics 1.0 (``_created`` included);
``tests/test_prometheus.py`` holds the two side by side.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.utils import floatToGoString

from agent.model import ATTRIBUTED_DOMAINS, JobRef
from agent.pipeline.snapshot import JobView, Snapshot

# Every job identity label starts with job_: none of them is a target label
# that Prometheus or the Prometheus Operator attaches to the scrape
# (namespace, pod, service, container, endpoint, instance, job, node), so
# none is renamed to exported_* or overwritten on the way in.
JOB_LABELS = ["job_id", "job_name", "job_kind", "job_namespace"]
_NOT_IN_LABEL_NAME = re.compile(r"[^a-zA-Z0-9_]")


class ExpositionFormat(Enum):
    TEXT = "text"  # the classic Prometheus text format, 0.0.4
    OPENMETRICS = "openmetrics"  # OpenMetrics 1.0: counters also carry _created


@dataclass(frozen=True, slots=True, eq=False)  # compared and hashed by identity: cheap on the hot path
class JobFamily:
    name: str
    kind: str  # "counter" or "gauge", as prometheus-client names the type
    documentation: str


ENERGY = JobFamily("jouleward_job_energy_joules", "counter", "Energy attributed to the job.")
POWER = JobFamily("jouleward_job_power_watts", "gauge", "Power attributed to the job over the last tick.")
CPU = JobFamily("jouleward_job_cpu_seconds", "counter", "CPU time of the job's processes.")
PROCESSES = JobFamily("jouleward_job_processes", "gauge", "Live processes of the job.")
FINISHED = JobFamily("jouleward_job_finished", "gauge", "1 once the job has ended.")
WORK = JobFamily("jouleward_job_work_units", "counter", "Units of work the job reported (samples, tokens, ...).")
INFO = JobFamily("jouleward_job_info", "gauge", "Job metadata; extra labels live here.")
EMISSIONS = JobFamily(
    "jouleward_job_emissions_grams",
    "counter",
    "Emissions attributed to the job, gCO2eq, each tick at the intensity in force then, PUE included.",
)
JOB_FAMILIES = (ENERGY, POWER, CPU, PROCESSES, FINISHED, WORK, INFO, EMISSIONS)


def safe(value: float) -> float:
    """Never export NaN, infinity or a negative energy or power."""
    return value if math.isfinite(value) and value > 0 else 0.0


def escape_label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def info_label_name(key: str) -> str:
    """A job label's name on ``jouleward_job_info``: ``label_`` and the key,
    every character outside [a-zA-Z0-9_] made ``_``."""
    return "label_" + _NOT_IN_LABEL_NAME.sub("_", key)


def info_labels(job: JobView) -> dict[str, str]:
    """The extra labels of a job's info series: the first key (in sorted
    order) wins where two keys give the same label name."""
    extra: dict[str, str] = {}
    for key, value in sorted(job.labels.items()):
        name = info_label_name(key)
        if name not in extra and name not in JOB_LABELS:
            extra[name] = value
    return extra


def _headers(fmt: ExpositionFormat) -> dict[str, bytes]:
    """Each family's HELP and TYPE lines, as prometheus-client writes them."""

    class Empty:
        def __init__(self, family: JobFamily) -> None:
            self.family = family

        def collect(self) -> Iterator[Metric]:
            maker = CounterMetricFamily if self.family.kind == "counter" else GaugeMetricFamily
            yield maker(self.family.name, self.family.documentation)

    headers = {}
    for family in JOB_FAMILIES:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Empty(family))
        if fmt is ExpositionFormat.TEXT:
            text = generate_latest(registry).decode()
        else:
            text = generate_openmetrics(registry).decode().removesuffix("# EOF\n")
        headers[family.name] = text.encode()
    return headers


_HEADERS = {fmt: _headers(fmt) for fmt in ExpositionFormat}


@dataclass(frozen=True, slots=True)
class _JobLabels:
    ref: JobRef
    identity: str  # the four job labels, escaped and in sorted order
    labels: dict[str, str]  # the job's own labels the info line was made from (the view's, shared)
    info: str  # the info series' label string


class JobFamiliesWriter:
    """Writes the per-job families of one snapshot. Keeps each job's escaped
    label strings from one rendering to the next (only the jobs of the last
    rendering, so it never holds more than the exported jobs)."""

    def __init__(self, fmt: ExpositionFormat) -> None:
        self.fmt = fmt
        self._headers = _HEADERS[fmt]
        self._labels: dict[str, _JobLabels] = {}

    def _job_labels(self, job: JobView, previous: dict[str, _JobLabels]) -> _JobLabels:
        ref = job.ref
        known = previous.get(ref.id)
        if known is not None and known.ref == ref and known.labels == job.labels:
            return known
        # Label names in sorted order, as the encoders write them: job_id < job_kind < job_name < job_namespace.
        identity = (
            f'job_id="{escape_label_value(ref.id)}",job_kind="{escape_label_value(ref.kind)}",'
            f'job_name="{escape_label_value(ref.name)}",job_namespace="{escape_label_value(ref.namespace)}"'
        )
        extra = info_labels(job)
        info = ",".join([identity, *(f'{name}="{escape_label_value(value)}"' for name, value in sorted(extra.items()))])
        return _JobLabels(ref, identity, job.labels, info)  # views' labels are never mutated

    def render(self, snap: Snapshot) -> bytes:
        openmetrics = self.fmt is ExpositionFormat.OPENMETRICS
        fmt = floatToGoString
        previous, labels = self._labels, {}
        for job in snap.jobs:
            labels[job.ref.id] = self._job_labels(job, previous)
        self._labels = labels
        node_domains = {d.domain for d in snap.devices}
        # Each family's lines go straight into one growing byte buffer: a list of
        # thousands of short strings, joined and then encoded, held the body about
        # three times over at its peak (docs/performance.md).
        lines: dict[JobFamily, bytearray] = {family: bytearray() for family in JOB_FAMILIES}
        created = ""  # the current job's _created value, "" where none is written

        def sample(family: JobFamily, series: str, value: float) -> None:
            out = lines[family]
            if family.kind == "gauge":
                out += f"{family.name}{series} {fmt(value)}\n".encode()
                return
            out += f"{family.name}_total{series} {fmt(value)}\n".encode()
            if created:
                out += f"{family.name}_created{series} {created}\n".encode()

        for job in snap.jobs:
            job_labels = labels[job.ref.id]
            identity = f"{{{job_labels.identity}}}"
            created = fmt(job.first_seen) if openmetrics and job.first_seen > 0 else ""
            # Every job gets a series for every attributed domain the node measures,
            # so a job that has used nothing yet still shows as 0, not as absent.
            for domain in ATTRIBUTED_DOMAINS:
                if domain in job.energy_j or domain in node_domains:
                    series = f'{{domain="{escape_label_value(domain)}",{job_labels.identity}}}'
                    sample(ENERGY, series, safe(job.energy_j.get(domain, 0.0)))
                    sample(POWER, series, safe(job.power_w.get(domain, 0.0)))
            sample(CPU, identity, safe(job.cpu_s))
            sample(PROCESSES, identity, float(job.processes))
            sample(FINISHED, identity, 0.0 if job.finished_at is None else 1.0)
            for unit, count in sorted(job.work_units.items()):
                sample(WORK, f'{{{job_labels.identity},unit="{escape_label_value(unit)}"}}', safe(count))
            sample(INFO, f"{{{job_labels.info}}}", 1.0)
            sample(EMISSIONS, identity, safe(job.emissions_g))
        headers = self._headers
        parts: list[bytes | bytearray] = []
        for family, written in lines.items():
            if family is INFO and not written:
                continue  # no jobs, no info family (it has no fixed label set to announce)
            parts.append(headers[family.name])
            parts.append(written)
        return b"".join(parts)


__all__ = [
    "JOB_FAMILIES",
    "JOB_LABELS",
    "ExpositionFormat",
    "JobFamiliesWriter",
    "escape_label_value",
    "info_label_name",
    "info_labels",
    "safe",
]
