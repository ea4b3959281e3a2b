"""GPU metric families read from the snapshot: identity, state, and each
job's allocated-but-idle GPU energy. Energy itself rides on the node and job
metrics with ``domain="gpu"``."""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.pipeline.snapshot import Snapshot

JOB_LABELS = ["job_id", "job_name", "job_kind", "namespace"]


def _safe(value: float) -> float:
    return value if math.isfinite(value) and value > 0 else 0.0


def gpu_families(snap: Snapshot) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "jouleward_gpu_info", "GPU identity; 1 per GPU the agent sees.", labels=["gpu", "uuid", "model", "mig"]
    )
    utilization = GaugeMetricFamily(
        "jouleward_gpu_utilization_ratio", "Share of time a kernel ran on the GPU (NVML), 0..1.", labels=["gpu"]
    )
    used = GaugeMetricFamily("jouleward_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
    total = GaugeMetricFamily("jouleward_gpu_memory_total_bytes", "GPU memory installed.", labels=["gpu"])
    limit = GaugeMetricFamily("jouleward_gpu_power_limit_watts", "Power limit the driver enforces.", labels=["gpu"])
    processes = GaugeMetricFamily("jouleward_gpu_processes", "Compute processes holding the GPU.", labels=["gpu"])
    for gpu in snap.gpus:
        label = [gpu.device]
        info.add_metric([gpu.device, gpu.uuid, gpu.name, "1" if gpu.mig_enabled else "0"], 1.0)
        if gpu.utilization_ratio is not None:
            utilization.add_metric(label, _safe(gpu.utilization_ratio))
        if gpu.memory_used_bytes is not None:
            used.add_metric(label, _safe(float(gpu.memory_used_bytes)))
        if gpu.memory_total_bytes is not None:
            total.add_metric(label, _safe(float(gpu.memory_total_bytes)))
        if gpu.power_limit_w is not None:
            limit.add_metric(label, _safe(gpu.power_limit_w))
        if gpu.processes_known:
            processes.add_metric(label, float(len(gpu.processes)))
    yield from (family for family in (info, utilization, used, total, limit, processes) if family.samples)
    idle = CounterMetricFamily(
        "jouleward_job_gpu_idle_energy_joules",
        "GPU static energy charged to the job while it held GPUs without using them "
        "(part of its domain=\"gpu\" energy).",
        labels=JOB_LABELS,
    )
    for job in snap.jobs:
        if "gpu" in job.energy_j:
            idle.add_metric([job.ref.id, job.ref.name, job.ref.kind, job.ref.namespace], _safe(job.gpu_idle_j))
    if idle.samples:
        yield idle
