"""GPU metric families read from the snapshot: identity, state, and each
job's allocated-but-idle GPU energy. Energy itself rides on the node and job
metrics with ``domain="gpu"``.

Every per-GPU series carries the join labels dcgm-exporter puts on its own
(``gpu`` index, ``UUID``, ``pci_bus_id``, ``Hostname``), so a query can put
jouleward's figures beside DCGM's with ``on (UUID)`` or ``on (Hostname, gpu)``
and no relabelling. The model is ``model_name``: DCGM's ``modelName`` is
camelCase, which the Prometheus naming lint (``promtool check metrics``)
rejects."""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.model import GpuDeviceView
from agent.pipeline.snapshot import Snapshot

JOB_LABELS = ["job_id", "job_name", "job_kind", "job_namespace"]
GPU_LABELS = ["gpu", "UUID", "model_name", "pci_bus_id", "Hostname"]


def _safe(value: float) -> float:
    return value if math.isfinite(value) and value > 0 else 0.0


def gpu_label_values(gpu: GpuDeviceView, node: str) -> list[str]:
    return [str(gpu.index), gpu.uuid, gpu.name, gpu.pci_bus_id, node]


def gpu_families(snap: Snapshot, node: str = "", created: bool = False) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "jouleward_gpu_info", "GPU identity; 1 per GPU the agent sees.", labels=[*GPU_LABELS, "device", "mig"]
    )
    utilization = GaugeMetricFamily(
        "jouleward_gpu_utilization_ratio", "Share of time a kernel ran on the GPU (NVML), 0..1.", labels=GPU_LABELS
    )
    used = GaugeMetricFamily("jouleward_gpu_memory_used_bytes", "GPU memory in use.", labels=GPU_LABELS)
    total = GaugeMetricFamily("jouleward_gpu_memory_total_bytes", "GPU memory installed.", labels=GPU_LABELS)
    limit = GaugeMetricFamily("jouleward_gpu_power_limit_watts", "Power limit the driver enforces.", labels=GPU_LABELS)
    processes = GaugeMetricFamily("jouleward_gpu_processes", "Compute processes holding the GPU.", labels=GPU_LABELS)
    for gpu in snap.gpus:
        label = gpu_label_values(gpu, node)
        # device= is the GPU's name on the node metrics (gpu-<index>): the info metric maps one to the other.
        info.add_metric([*label, gpu.device, "1" if gpu.mig_enabled else "0"], 1.0)
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
            idle.add_metric(
                [job.ref.id, job.ref.name, job.ref.kind, job.ref.namespace],
                _safe(job.gpu_idle_j),
                created=job.first_seen if created and job.first_seen else None,
            )
    if idle.samples:
        yield idle
