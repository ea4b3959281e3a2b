"""Which ML job a pod belongs to.

A distributed training run is many pods on many nodes. Every node derives the
same job identity from the pod's metadata alone, so ``sum by (job_id)`` over
all nodes' series is the whole run. The identity is the UID of the object
that owns the run (the PyTorchJob, JobSet, batch Job, ...): re-creating a job
under the same name is a new object with a new UID, so each run is its own
job with its own counters, report and budget, while the name stays the
``job_name`` label. Pod names and other per-pod metadata go on the info
metric only.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeGuard

from agent.config import DEFAULT_JOB_LABELS
from agent.model import EXTERNAL_CONTROL_CHAR_CLASS, EXTERNAL_NAME_MAX_LEN, JobRef
from agent.workloads.kubelet import PodMeta

JOB_ANNOTATION = "jouleward.io/job"


# Where the UID of the run's object is, for each name label: a pod label that
# carries it, or OWNER: the pod's controlling owner reference, when that owner
# is the named object itself (the training operator, Volcano and KubeRay own
# their pods directly). A name label not listed here (LeaderWorkerSet, whose
# pods belong to several StatefulSets; labels from the configuration) and the
# annotation key the job by namespace and name.
OWNER = "ownerReferences"
UID_SOURCES = {
    "training.kubeflow.org/job-name": (OWNER,),
    "jobset.sigs.k8s.io/jobset-name": ("jobset.sigs.k8s.io/jobset-uid",),
    "volcano.sh/job-name": (OWNER,),
    "ray.io/cluster": (OWNER,),
    "batch.kubernetes.io/job-name": ("batch.kubernetes.io/controller-uid", "controller-uid", OWNER),
}

MAX_JOB_NAME_LEN = EXTERNAL_NAME_MAX_LEN
_CONTROL = re.compile(f"[{EXTERNAL_CONTROL_CHAR_CLASS}]")
_UID = re.compile(r"[0-9a-fA-F-]{8,64}")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


@dataclass(frozen=True)
class PodJob:
    job: JobRef
    source: str  # "annotation", the label key that matched, or "pod"


def _usable(value: str | None) -> TypeGuard[str]:
    return value is not None and bool(value.strip()) and len(value) <= MAX_JOB_NAME_LEN and not _CONTROL.search(value)


def job_id_from_uid(uid: str) -> str:
    """The run's object UID: the same on every node, new on every re-creation."""
    return f"k8s-{uid.strip().lower()}"


def job_id_from_name(namespace: str, name: str) -> str:
    """Where no UID names the run: namespace and name, safe in a URL path.
    A namespace is a DNS label (no ``.``), so the first ``.`` splits the two;
    a name with other characters than ``[A-Za-z0-9._-]`` is hashed."""
    if _PLAIN_NAME.fullmatch(name):
        return f"k8s-{namespace}.{name}"
    return f"k8s-{namespace}.{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def _run_uid(pod: PodMeta, name_label: str, name: str) -> str | None:
    for source in UID_SOURCES.get(name_label, ()):
        if source == OWNER:
            value = pod.owner_uid if pod.owner_name == name else None
        else:
            value = pod.labels.get(source)
        if value and _UID.fullmatch(value.strip()):
            return value
    return None


def job_for_pod(pod: PodMeta, label_keys: Iterable[str] = DEFAULT_JOB_LABELS) -> PodJob:
    """The annotation wins, then the first matching label, else the pod itself."""
    annotation = pod.annotations.get(JOB_ANNOTATION)
    if _usable(annotation):
        name = annotation.strip()
        ref = JobRef(id=job_id_from_name(pod.namespace, name), name=name, kind="pod", namespace=pod.namespace)
        return PodJob(ref, "annotation")
    for key in label_keys:
        value = pod.labels.get(key)
        if _usable(value):
            name = value.strip()
            uid = _run_uid(pod, key, name)
            ident = job_id_from_uid(uid) if uid else job_id_from_name(pod.namespace, name)
            return PodJob(JobRef(id=ident, name=name, kind="pod", namespace=pod.namespace), key)
    # A pod of its own: the same id it had before its metadata arrived.
    return PodJob(JobRef(id=f"pod-{pod.uid}", name=pod.name, kind="pod", namespace=pod.namespace), "pod")


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
