"""Which ML job a pod belongs to.

A distributed training run is many pods on many nodes. Every node derives the
same job identity from the pod's metadata alone (namespace plus job name), so
``sum by (namespace, job_name)`` over all nodes' series is the whole run.
Pod names and other per-pod metadata go on the info metric only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from agent.config import DEFAULT_JOB_LABELS
from agent.model import EXTERNAL_CONTROL_CHAR_CLASS, EXTERNAL_NAME_MAX_LEN, JobRef
from agent.workloads.kubelet import PodMeta

JOB_ANNOTATION = "jouleward.io/job"


MAX_JOB_NAME_LEN = EXTERNAL_NAME_MAX_LEN
_CONTROL = re.compile(f"[{EXTERNAL_CONTROL_CHAR_CLASS}]")


@dataclass(frozen=True)
class PodJob:
    job: JobRef
    source: str  # "annotation", the label key that matched, or "pod"


def _usable(value: str | None) -> bool:
    return bool(value and value.strip()) and len(value) <= MAX_JOB_NAME_LEN and not _CONTROL.search(value)


def job_id(namespace: str, name: str) -> str:
    """Stable on every node: namespaces hold no ``/``, so the split is unambiguous."""
    return f"k8s-{namespace}/{name}"


def job_for_pod(pod: PodMeta, label_keys: Iterable[str] = DEFAULT_JOB_LABELS) -> PodJob:
    """The annotation wins, then the first matching label, else the pod itself."""
    candidates = [(JOB_ANNOTATION, pod.annotations.get(JOB_ANNOTATION), "annotation")]
    candidates += [(key, pod.labels.get(key), key) for key in label_keys]
    for _key, value, source in candidates:
        if _usable(value):
            name = value.strip()
            return PodJob(
                JobRef(id=job_id(pod.namespace, name), name=name, kind="pod", namespace=pod.namespace), source
            )
    return PodJob(JobRef(id=job_id(pod.namespace, pod.name), name=pod.name, kind="pod", namespace=pod.namespace), "pod")


def pod_info_labels(pod: PodMeta, source: str) -> dict[str, str]:
    """Per-pod metadata for ``jouleward_job_info`` (never for counters)."""
    return {
        "pod": pod.name,
        "pod_uid": pod.uid,
        "node": pod.node,
        "owner_kind": pod.owner_kind,
        "owner_name": pod.owner_name,
        "job_source": source,
    }
