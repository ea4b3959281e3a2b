import re
from urllib.parse import quote

from agent.workloads.kubelet import PodMeta
from agent.workloads.mljob import job_for_pod, pod_info_labels

RUN_1 = "6f1c1a7e-0b1d-4c55-9a3e-1d2b3c4d5e6f"
RUN_2 = "0a9b8c7d-6e5f-4a3b-8c2d-1e0f9a8b7c6d"


def pod(name, labels=None, annotations=None, namespace="research", uid=None, owner=("", "", "")):
    return PodMeta(
        uid=uid or f"uid-{name}",
        name=name,
        namespace=namespace,
        node="n1",
        labels=labels or {},
        annotations=annotations or {},
        owner_kind=owner[0],
        owner_name=owner[1],
        owner_uid=owner[2],
    )


def test_two_pods_of_one_kubeflow_job_share_one_identity():
    labels = {"training.kubeflow.org/job-name": "llama-ft", "training.kubeflow.org/replica-type": "worker"}
    a = job_for_pod(pod("llama-ft-worker-0", labels, uid="u1"))
    b = job_for_pod(pod("llama-ft-worker-1", labels, uid="u2"))
    assert a.job == b.job
    assert (a.job.name, a.job.namespace, a.job.kind, a.job.id) == (
        "llama-ft",
        "research",
        "pod",
        "k8s-research.llama-ft",
    )
    assert a.source == "training.kubeflow.org/job-name"


def test_a_rerun_under_the_same_name_is_a_new_job():
    labels = {"training.kubeflow.org/job-name": "llama-ft"}
    first = [
        job_for_pod(pod(f"llama-ft-worker-{i}", labels, uid=f"a{i}", owner=("PyTorchJob", "llama-ft", RUN_1)))
        for i in range(2)
    ]
    again = job_for_pod(pod("llama-ft-worker-0", labels, uid="b0", owner=("PyTorchJob", "llama-ft", RUN_2)))
    assert first[0].job == first[1].job
    assert first[0].job.id == f"k8s-{RUN_1}" and again.job.id == f"k8s-{RUN_2}"
    assert first[0].job.name == again.job.name == "llama-ft"


def test_jobset_and_batch_job_ids_come_from_their_uid_labels():
    jobset = {
        "jobset.sigs.k8s.io/jobset-name": "ft",
        "jobset.sigs.k8s.io/jobset-uid": RUN_1,
        "batch.kubernetes.io/job-name": "ft-workers-0",
        "batch.kubernetes.io/controller-uid": RUN_2,
    }
    # The child Job owns the pod; the JobSet's UID is the run's identity on every child Job's pods.
    found = job_for_pod(pod("ft-workers-0-0", jobset, owner=("Job", "ft-workers-0", RUN_2)))
    assert (found.job.id, found.job.name) == (f"k8s-{RUN_1}", "ft")
    batch = job_for_pod(
        pod("etl-x7", {"batch.kubernetes.io/job-name": "etl", "batch.kubernetes.io/controller-uid": RUN_2})
    )
    assert (batch.job.id, batch.job.name) == (f"k8s-{RUN_2}", "etl")


def test_an_owner_of_another_name_does_not_name_the_run():
    # A LeaderWorkerSet's pods belong to several StatefulSets: keyed by name, not by any one owner.
    labels = {"leaderworkerset.sigs.k8s.io/name": "serve"}
    leader = job_for_pod(pod("serve-0", labels, owner=("StatefulSet", "serve", RUN_1)))
    worker = job_for_pod(pod("serve-0-1", labels, owner=("StatefulSet", "serve-0", RUN_2)))
    assert leader.job.id == worker.job.id == "k8s-research.serve"


def test_every_job_id_is_safe_in_a_url_path():
    odd = job_for_pod(pod("x", {}, {"jouleward.io/job": "sweep 42/lr=3e-4"}))
    assert odd.job.name == "sweep 42/lr=3e-4"
    assert re.fullmatch(r"k8s-research\.[0-9a-f]{16}", odd.job.id)
    for found in (
        odd,
        job_for_pod(pod("p", {"volcano.sh/job-name": "bert"})),
        job_for_pod(pod("p", {"ray.io/cluster": "rc"}, owner=("RayCluster", "rc", RUN_1))),
    ):
        assert quote(found.job.id, safe="") == found.job.id.replace("~", "%7E") and "/" not in found.job.id


def test_same_job_name_in_two_namespaces_differs():
    labels = {"volcano.sh/job-name": "bert"}
    assert job_for_pod(pod("p", labels, namespace="a")).job.id != job_for_pod(pod("p", labels, namespace="b")).job.id


def test_annotation_wins_over_labels():
    found = job_for_pod(pod("w", {"ray.io/cluster": "rc"}, {"jouleward.io/job": "sweep-42"}))
    assert (found.job.name, found.source) == ("sweep-42", "annotation")


def test_jobset_name_beats_its_child_batch_job_name():
    labels = {"batch.kubernetes.io/job-name": "ft-workers-0", "jobset.sigs.k8s.io/jobset-name": "ft"}
    assert job_for_pod(pod("ft-workers-0-0", labels)).job.name == "ft"


def test_each_operator_label_is_recognised():
    for key in (
        "jobset.sigs.k8s.io/jobset-name",
        "batch.kubernetes.io/job-name",
        "ray.io/cluster",
        "volcano.sh/job-name",
        "leaderworkerset.sigs.k8s.io/name",
    ):
        assert job_for_pod(pod("x-0", {key: "J"})).job.name == "J", key


def test_pod_without_job_labels_is_its_own_job():
    found = job_for_pod(pod("notebook-7", {"app": "jupyter"}))
    assert (found.job.name, found.source, found.job.id) == ("notebook-7", "pod", "pod-uid-notebook-7")


def test_configured_label_list_replaces_the_defaults():
    p = pod("x", {"team.example.com/run": "r1", "ray.io/cluster": "rc"})
    assert job_for_pod(p, ["team.example.com/run"]).job.name == "r1"
    assert job_for_pod(p, []).job.name == "x"


def test_unusable_annotation_falls_back():
    assert job_for_pod(pod("x", {"ray.io/cluster": "rc"}, {"jouleward.io/job": "bad\nname"})).job.name == "rc"
    assert job_for_pod(pod("x", {}, {"jouleward.io/job": "z" * 300})).job.name == "x"


def test_info_labels_carry_the_pod_not_the_counters():
    p = PodMeta(uid="u", name="w-0", namespace="ns", node="n1", owner_kind="PyTorchJob", owner_name="ft")
    info = pod_info_labels(p, "pod")
    assert info == {
        "pod": "w-0",
        "pod_uid": "u",
        "node": "n1",
        "owner_kind": "PyTorchJob",
        "owner_name": "ft",
        "job_source": "pod",
    }
