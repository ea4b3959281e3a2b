from agent.workloads.kubelet import PodMeta
from agent.workloads.mljob import job_for_pod, pod_info_labels


def pod(name, labels=None, annotations=None, namespace="research", uid=None):
    return PodMeta(
        uid=uid or f"uid-{name}",
        name=name,
        namespace=namespace,
        node="n1",
        labels=labels or {},
        annotations=annotations or {},
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
        "k8s-research/llama-ft",
    )
    assert a.source == "training.kubeflow.org/job-name"


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
    assert (found.job.name, found.source, found.job.id) == ("notebook-7", "pod", "k8s-research/notebook-7")


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
