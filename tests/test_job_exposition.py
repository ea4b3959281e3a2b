"""The per-job families' own writer against prometheus-client's encoders:
the same families built as prometheus-client metric families (the oracle
below) must encode to the same bytes, in both formats."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from agent.model import ATTRIBUTED_DOMAINS, DeviceView, JobRef, JobTotals, JobView
from agent.pipeline.snapshot import EMPTY_SNAPSHOT, Health, Snapshot
from exporters.jobs import ExpositionFormat, JobFamiliesWriter
from exporters.prometheus import render_snapshot

IDENTITY = ["job_id", "job_name", "job_kind", "job_namespace"]


def clean(value: float) -> float:
    return value if math.isfinite(value) and value > 0 else 0.0


class Oracle:
    """The per-job families as prometheus-client metric families."""

    def __init__(self, snap: Snapshot, created: bool) -> None:
        self.snap, self.created = snap, created

    def collect(self):
        snap = self.snap
        energy = CounterMetricFamily(
            "jouleward_job_energy_joules", "Energy attributed to the job.", labels=[*IDENTITY, "domain"]
        )
        power = GaugeMetricFamily(
            "jouleward_job_power_watts", "Power attributed to the job over the last tick.", labels=[*IDENTITY, "domain"]
        )
        cpu = CounterMetricFamily("jouleward_job_cpu_seconds", "CPU time of the job's processes.", labels=IDENTITY)
        processes = GaugeMetricFamily("jouleward_job_processes", "Live processes of the job.", labels=IDENTITY)
        finished = GaugeMetricFamily("jouleward_job_finished", "1 once the job has ended.", labels=IDENTITY)
        work = CounterMetricFamily(
            "jouleward_job_work_units",
            "Units of work the job reported (samples, tokens, ...).",
            labels=[*IDENTITY, "unit"],
        )
        info = GaugeMetricFamily("jouleward_job_info", "Job metadata; extra labels live here.")
        emissions = CounterMetricFamily(
            "jouleward_job_emissions_grams",
            "Emissions attributed to the job, gCO2eq, each tick at the intensity in force then, PUE included.",
            labels=IDENTITY,
        )
        node_domains = {d.domain for d in snap.devices}
        for job in snap.jobs:
            ids = [job.ref.id, job.ref.name, job.ref.kind, job.ref.namespace]
            created = job.first_seen if self.created and job.first_seen > 0 else None
            for domain in ATTRIBUTED_DOMAINS:
                if domain in job.energy_j or domain in node_domains:
                    energy.add_metric([*ids, domain], clean(job.energy_j.get(domain, 0.0)), created=created)
                    power.add_metric([*ids, domain], clean(job.power_w.get(domain, 0.0)))
            cpu.add_metric(ids, clean(job.cpu_s), created=created)
            processes.add_metric(ids, float(job.processes))
            finished.add_metric(ids, 0.0 if job.finished_at is None else 1.0)
            for unit, count in sorted(job.work_units.items()):
                work.add_metric([*ids, unit], clean(count), created=created)
            extra: dict[str, str] = {}
            for key, value in sorted(job.labels.items()):
                name = "label_" + "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in key)
                if name not in extra and name not in IDENTITY:
                    extra[name] = value
            one = GaugeMetricFamily("jouleward_job_info", "", labels=[*IDENTITY, *extra])
            one.add_metric([*ids, *extra.values()], 1.0)
            info.samples.extend(one.samples)
            emissions.add_metric(ids, clean(job.emissions_g), created=created)
        yield from (energy, power, cpu, processes, finished, work)
        if snap.jobs:
            yield info
        yield emissions


def oracle_bytes(snap: Snapshot, fmt: ExpositionFormat) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Oracle(snap, created=fmt is ExpositionFormat.OPENMETRICS))
    if fmt is ExpositionFormat.TEXT:
        return generate_latest(registry)
    return generate_openmetrics(registry).removesuffix(b"# EOF\n")


def job(index: int, **changes) -> JobView:
    fields = dict(
        ref=JobRef(f"job-{index}", f"train-{index}", "registered", ""),
        labels={"team": "ml"},
        power_w={"cpu": 12.5},
        processes=3,
        finished_at=None,
        totals=JobTotals(
            energy_j={"cpu": 1234.5678, "dram": 1e-9}, cpu_s=61.25, work_units={"tokens": 1e6}, emissions_g=0.75
        ),
        first_seen=1_733_318_400.125,
    )
    fields.update(changes)
    return JobView(**fields)


def snapshot(jobs, devices=("cpu", "dram")) -> Snapshot:
    views = tuple(DeviceView(d, f"{d}-0", "rapl", 10.0, 1.0) for d in devices)
    return Snapshot(1.0, 1.0, 0.5, views, {}, {}, {}, tuple(jobs), Health())


AWKWARD = [
    job(0),
    job(1, ref=JobRef('k8s-uid/"quoted"\\back\nslash', "név ☃", "pod", "ns-1"), finished_at=5.0, processes=0),
    job(2, labels={"a.b": "1", "a-b": "2", "z": 'x"y', "job_id": "shadow", "": "empty"}, first_seen=0.0),
    job(
        3,
        power_w={"gpu": float("nan")},
        totals=JobTotals(
            energy_j={"gpu": -5.0, "cpu": float("inf")}, cpu_s=float("nan"), work_units={}, emissions_g=-1.0
        ),
    ),
    job(4, totals=JobTotals(energy_j={}, cpu_s=123456789.123, work_units={"samples": 7.0, "b\\unit": 2.5})),
]


@pytest.mark.parametrize("fmt", list(ExpositionFormat))
def test_the_job_writer_writes_what_prometheus_client_writes(fmt):
    for snap in (snapshot(AWKWARD), snapshot(AWKWARD, devices=("cpu", "dram", "gpu")), snapshot([]), EMPTY_SNAPSHOT):
        writer = JobFamiliesWriter(fmt)
        assert writer.render(snap) == oracle_bytes(snap, fmt)
        # Again from the kept label strings, and after a job's labels and identity changed.
        assert writer.render(snap) == oracle_bytes(snap, fmt)
        changed = snapshot([job(0, labels={"team": "infra"}), job(1, ref=JobRef("job-1", "renamed", "env"))])
        assert writer.render(changed) == oracle_bytes(changed, fmt)


labels = st.dictionaries(st.text(max_size=6), st.text(max_size=8), max_size=4)
values = st.floats(allow_nan=True, allow_infinity=True)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.text(min_size=1, max_size=10), st.text(max_size=10), labels, values, values, st.booleans()),
        max_size=6,
        unique_by=lambda t: t[0],
    )
)
def test_any_jobs_encode_as_prometheus_client_encodes_them(specs):
    jobs = [
        job(
            i,
            ref=JobRef(job_id, name, "env", "ns"),
            labels=extra,
            totals=JobTotals(energy_j={"cpu": energy}, cpu_s=cpu, work_units={"u": energy}),
            finished_at=1.0 if done else None,
        )
        for i, (job_id, name, extra, energy, cpu, done) in enumerate(specs)
    ]
    snap = snapshot(jobs)
    for fmt in ExpositionFormat:
        assert JobFamiliesWriter(fmt).render(snap) == oracle_bytes(snap, fmt)


def test_the_whole_openmetrics_body_parses_strictly_and_ends_once():
    body = render_snapshot(snapshot(AWKWARD), ExpositionFormat.OPENMETRICS).decode()
    assert body.endswith("# EOF\n") and body.count("# EOF") == 1
    families = {f.name: f for f in parse_openmetrics(body)}
    created = [s for s in families["jouleward_job_energy_joules"].samples if s.name.endswith("_created")]
    assert {s.labels["job_id"] for s in created} == {
        "job-0",
        AWKWARD[1].ref.id,
        "job-3",
        "job-4",
    }  # job-2 has no start time
    assert all(s.value == pytest.approx(1_733_318_400.125) for s in created)
    assert families["jouleward_node_info"].samples  # the registry's families are still there
