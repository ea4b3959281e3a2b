"""GPU allocation from the kubelet's pod-resources API (gRPC ``v1.PodResourcesLister``).

The kubelet serves it on a Unix socket (``/var/lib/kubelet/pod-resources/kubelet.sock``)
to whoever may open the socket: no token, no RBAC, nothing asked of the API
server. It answers which device-plugin devices (``nvidia.com/gpu``,
``nvidia.com/mig-*``, time-sliced replicas) and which DRA claims each
container of each pod was given. The pod is named by namespace and name only;
its UID, and so its job, come from the kubelet poller's pod metadata
(``job_for_pod``, the same identity its processes resolve to).

grpcio is imported only when this source is read, so an agent without it
configured carries none of it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from agent.config import DEFAULT_JOB_LABELS
from agent.model import GpuAllocation, JobRef
from agent.workloads.allocation import AllocationError, AllocationRead
from agent.workloads.kubelet import PodMeta
from agent.workloads.mljob import job_for_pod

# Device-plugin resources that are NVIDIA GPUs: nvidia.com/gpu, nvidia.com/gpu.shared,
# nvidia.com/mig-1g.10gb, ... (other nvidia.com resources, such as RDMA, are not).
_GPU_RESOURCE = re.compile(r"nvidia\.com/(gpu|mig-)")
# DRA drivers whose claims are GPUs.
GPU_DRIVERS = ("gpu.nvidia.com",)
_UUID = re.compile(r"(?:GPU|MIG)-[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def claim_device_id(driver: str, device_name: str, cdi_names: Iterable[str]) -> str | None:
    """A DRA claim's device as attribution names it: a UUID in its CDI
    names where there is one, else the driver's device name (``gpu-0``)."""
    if driver not in GPU_DRIVERS:
        return None
    for name in cdi_names:
        found = _UUID.search(name)
        if found:
            return found.group(0)
    return device_name or None


def pod_devices(response: Any) -> list[tuple[str, str, str]]:
    """(namespace, pod name, device id) for every GPU in a ListPodResourcesResponse."""
    found: list[tuple[str, str, str]] = []
    for pod in response.pod_resources:
        for container in pod.containers:
            for devices in container.devices:
                if _GPU_RESOURCE.match(devices.resource_name):
                    found.extend((pod.namespace, pod.name, device_id) for device_id in devices.device_ids)
            for claim in container.dynamic_resources:
                for resource in claim.claim_resources:
                    device_id = claim_device_id(
                        resource.driver_name, resource.device_name, (cdi.name for cdi in resource.cdi_devices)
                    )
                    if device_id:
                        found.append((pod.namespace, pod.name, device_id))
    return found


def allocatable_gpus(response: Any) -> int:
    return sum(len(d.device_ids) for d in response.devices if _GPU_RESOURCE.match(d.resource_name))


def allocations_for(
    devices: list[tuple[str, str, str]],
    pods: Mapping[str, PodMeta],
    label_keys: tuple[str, ...] = DEFAULT_JOB_LABELS,
) -> tuple[tuple[GpuAllocation, ...], int]:
    """Pods named by namespace and name to their jobs; (allocations, unmapped device ids)."""
    by_name = {(pod.namespace, pod.name): pod for pod in pods.values()}
    jobs: dict[tuple[str, str], JobRef] = {}
    seen: set[tuple[str, str]] = set()
    out: list[GpuAllocation] = []
    unmapped = 0
    for namespace, name, device_id in devices:
        meta = by_name.get((namespace, name))
        if meta is None:
            unmapped += 1
            continue
        job = jobs.get((namespace, name))
        if job is None:
            job = jobs[(namespace, name)] = job_for_pod(meta, label_keys).job
        if (job.id, device_id) in seen:  # the same device in two containers of one pod
            continue
        seen.add((job.id, device_id))
        out.append(GpuAllocation(job, device_id, "kubelet"))
    return tuple(out), unmapped


def pod_devices_of(socket: Path, timeout_s: float) -> tuple[list[tuple[str, str, str]], int]:
    """One read of the socket: (namespace, pod, device id) per allocated GPU, and
    the GPUs the kubelet can allocate. Raises AllocationError."""
    try:
        import grpc

        from agent.workloads.podresources_v1 import api_pb2, api_pb2_grpc
    except ImportError as exc:  # pragma: no cover - grpcio is a dependency
        raise AllocationError(f"grpcio is not installed: {exc}") from None
    if not socket.is_socket():
        raise AllocationError(f"no pod-resources socket at {socket}")
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.enable_http_proxy", 0)]
    try:
        with grpc.insecure_channel(f"unix://{socket}", options=options) as channel:
            stub = api_pb2_grpc.PodResourcesListerStub(channel)
            listed = stub.List(api_pb2.ListPodResourcesRequest(), timeout=timeout_s)
            try:
                allocatable = allocatable_gpus(
                    stub.GetAllocatableResources(api_pb2.AllocatableResourcesRequest(), timeout=timeout_s)
                )
            except grpc.RpcError:
                allocatable = 0  # older kubelets, or the feature gate off: List alone is enough
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        raise AllocationError(f"pod-resources {getattr(code, 'name', code)}: {details}") from None
    return pod_devices(listed), allocatable


class PodResourcesReader:
    """Reads the pod-resources socket and names each pod's job."""

    def __init__(
        self,
        socket: Path,
        timeout_s: float,
        pods: Callable[[], Mapping[str, PodMeta]] | None,
        label_keys: tuple[str, ...] = DEFAULT_JOB_LABELS,
    ) -> None:
        self.socket = socket
        self.timeout_s = timeout_s
        self._pods = pods
        self._label_keys = label_keys

    def __call__(self) -> AllocationRead:
        devices, allocatable = pod_devices_of(self.socket, self.timeout_s)
        allocations, unmapped = allocations_for(devices, self._pods() if self._pods else {}, self._label_keys)
        return AllocationRead(allocations, unmapped, allocatable)
