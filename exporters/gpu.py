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

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.model import GpuDeviceView
from agent.pipeline.snapshot import Snapshot
from exporters.jobs import JOB_LABELS
from exporters.jobs import safe as _safe

GPU_LABELS = ["gpu", "UUID", "model_name", "pci_bus_id", "Hostname"]


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
    yield from allocation_families(snap, node)


def allocation_families(snap: Snapshot, node: str = "") -> Iterator[Metric]:
    """MIG instances' energy; GPUs as the scheduler allocated them (where an allocation source runs)."""
    alloc = snap.gpu_allocation
    views = {gpu.device: gpu for gpu in snap.gpus}
    instance = CounterMetricFamily(
        "jouleward_gpu_instance_energy_joules",
        "A MIG device's share of its GPU's energy; source says what split it (nvml, dcgm or slices).",
        labels=[*GPU_LABELS, "GPU_I_ID", "mig_uuid", "source"],
    )
    for (device, gi, mig_uuid, source), joules in sorted(alloc.instance_energy_j.items()):
        if device in views:
            instance.add_metric([*gpu_label_values(views[device], node), str(gi), mig_uuid, source], _safe(joules))
    if instance.samples:
        yield instance
    if not alloc.sources:
        return
    families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
        "up": GaugeMetricFamily(
            "jouleward_gpu_allocation_up", "1 when the last read of the allocation source succeeded.", labels=["source"]
        ),
        "stale": GaugeMetricFamily(
            "jouleward_gpu_allocation_stale",
            "1 when the allocation in force may be out of date (the last read failed or is overdue).",
            labels=["source"],
        ),
        "errors": CounterMetricFamily(
            "jouleward_gpu_allocation_errors", "Failed reads of the allocation source.", labels=["source"]
        ),
        "last": GaugeMetricFamily(
            "jouleward_gpu_allocation_last_success_timestamp_seconds",
            "Unix time of the last successful read (0 before the first).",
            labels=["source"],
        ),
        "known": GaugeMetricFamily(
            "jouleward_gpu_allocations", "Device allocations known: (device, job) pairs.", labels=["source"]
        ),
        "unmapped": GaugeMetricFamily(
            "jouleward_gpu_allocations_unmapped",
            "Allocations skipped: a pod without metadata, or a mapping file unlike the convention.",
            labels=["source"],
        ),
        "allocatable": GaugeMetricFamily(
            "jouleward_gpu_allocatable_devices",
            "GPU devices the scheduler can allocate on this node, where it says (0 where it does not).",
            labels=["source"],
        ),
    }
    for health in alloc.sources:
        families["up"].add_metric([health.source], 1.0 if health.up else 0.0)
        families["stale"].add_metric([health.source], 1.0 if health.stale else 0.0)
        families["errors"].add_metric([health.source], float(health.errors_total))
        families["last"].add_metric([health.source], _safe(health.last_success_unix_s))
        families["known"].add_metric([health.source], float(health.allocations))
        families["unmapped"].add_metric([health.source], float(health.unmapped))
        families["allocatable"].add_metric([health.source], float(health.allocatable_devices))
    yield from families.values()
    yield GaugeMetricFamily(
        "jouleward_gpu_allocations_unseen",
        "Allocations on the last tick naming a GPU the agent does not see (hidden by gpu_visible_devices, or down).",
        value=float(alloc.unseen_devices),
    )

    jobs = GaugeMetricFamily(
        "jouleward_gpu_allocated_jobs", "Jobs the GPU is allocated to on the last tick.", labels=GPU_LABELS
    )
    idle = CounterMetricFamily(
        "jouleward_gpu_unallocated_idle_energy_joules",
        "Static energy of the GPU while allocated to no job (part of the node's idle energy).",
        labels=GPU_LABELS,
    )
    use = CounterMetricFamily(
        "jouleward_gpu_unallocated_use_energy_joules",
        "Energy charged to jobs that used the GPU without being allocated it.",
        labels=GPU_LABELS,
    )
    for device, count in sorted(alloc.jobs_per_gpu.items()):
        if device in views:
            jobs.add_metric(gpu_label_values(views[device], node), float(count))
    for family, totals in ((idle, alloc.unallocated_idle_j), (use, alloc.unallocated_use_j)):
        for device, joules in sorted(totals.items()):
            if device in views:
                family.add_metric(gpu_label_values(views[device], node), _safe(joules))
    yield from (family for family in (jobs, idle, use) if family.samples)

    allocated = GaugeMetricFamily(
        "jouleward_job_gpus_allocated",
        "GPUs (or MIG devices, or time-sliced replicas' GPUs) allocated to the job on the last tick.",
        labels=JOB_LABELS,
    )
    unallocated = GaugeMetricFamily(
        "jouleward_job_gpus_unallocated_use",
        "GPUs the job used on the last tick without being allocated them (charged by use).",
        labels=JOB_LABELS,
    )
    users: dict[str, int] = {}
    for job_ids in alloc.unallocated_users.values():
        for job_id in job_ids:
            users[job_id] = users.get(job_id, 0) + 1
    for job in snap.jobs:
        label = [job.ref.id, job.ref.name, job.ref.kind, job.ref.namespace]
        if job.ref.id in alloc.devices_per_job:
            allocated.add_metric(label, float(alloc.devices_per_job[job.ref.id]))
        if job.ref.id in users:
            unallocated.add_metric(label, float(users[job.ref.id]))
    yield from (family for family in (allocated, unallocated) if family.samples)
