"""Pod and Slurm processes resolved to their jobs from metadata: a real
kubelet server on loopback, the real poller, and process facts read from
fixture ``/proc/<pid>`` directories (the cgroup and environ files)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from agent.model import ProcessKey
from agent.pipeline.snapshot import EMPTY_SNAPSHOT, Health
from agent.workloads.kubelet import KubeletHealth, KubeletPoller, KubeletSettings
from agent.workloads.procfs import ProcessFacts, ScannedProcess
from agent.workloads.registry import Registry
from agent.workloads.resolve import JobResolver
from exporters.prometheus import render_snapshot
from tests.support import metric_sum, parse_metrics, wait_until
from tests.support.kubelet_server import FakeKubelet, pod_item

TOKEN = "pod-metadata-token"
UID_0 = "5d1f3a2b-0000-4c1d-8e2f-000000000000"
UID_1 = "5d1f3a2b-1111-4c1d-8e2f-111111111111"
UID_2 = "5d1f3a2b-2222-4c1d-8e2f-222222222222"
KUBEFLOW = "training.kubeflow.org/job-name"


def worker(uid: str, index: int) -> dict:
    return pod_item(
        uid,
        f"llama-ft-worker-{index}",
        "research",
        {KUBEFLOW: "llama-ft"},
        node="gpu-node-3",
        owner=("PyTorchJob", "llama-ft"),
    )


def pod_cgroup(uid: str) -> str:
    return (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid.replace('-', '_')}.slice/"
        f"cri-containerd-{'e' * 64}.scope"
    )


class FixtureProcs:
    """``/proc/<pid>/{cgroup,environ}`` as the kernel writes them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.next_pid = 100

    def add(self, cgroup: str, environ: dict[str, str] | None = None) -> ScannedProcess:
        self.next_pid += 1
        directory = self.root / str(self.next_pid)
        directory.mkdir(parents=True)
        (directory / "cgroup").write_text(f"4:memory:/\n0::{cgroup}\n")
        (directory / "environ").write_bytes(
            b"".join(f"{k}={v}".encode() + b"\0" for k, v in {"PATH": "/bin", **(environ or {})}.items())
        )
        return ScannedProcess(ProcessKey(self.next_pid, 1000 + self.next_pid), 1, 0.1, ProcessFacts(str(directory)))


@pytest.fixture
def procs(tmp_path):
    return FixtureProcs(tmp_path / "proc")


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
def kubelet():
    server = FakeKubelet(TOKEN, [])
    yield server
    server.stop()


def by_pid(processes, jobs):
    return {p.key.pid: job for p, job in zip(processes, jobs)}


def test_two_pods_of_one_training_job_resolve_to_one_job_once_metadata_arrives(kubelet, token_file, procs, tmp_path):
    poller = KubeletPoller(KubeletSettings(url=kubelet.url, ca_file=kubelet.ca_file, token_file=token_file, poll_s=60))
    resolver = JobResolver(Registry(tmp_path), pods=poller)
    processes = [procs.add(pod_cgroup(UID_0)), procs.add(pod_cgroup(UID_0)), procs.add(pod_cgroup(UID_1))]

    # Before any metadata each pod is its own job, keyed by its UID.
    jobs = resolver.resolve(processes)
    assert [j.id for j in jobs] == [f"pod-{UID_0}", f"pod-{UID_0}", f"pod-{UID_1}"]
    assert {j.namespace for j in jobs} == {""}
    assert resolver.info_labels[f"pod-{UID_1}"] == {"pod_uid": UID_1}

    # Metadata arrives: the same, already-seen processes move to the ML job on the next tick.
    kubelet.pods = [worker(UID_0, 0), worker(UID_1, 1)]
    assert poller.poll_once()
    jobs = resolver.resolve(processes)
    assert {(j.id, j.name, j.kind, j.namespace) for j in jobs} == {
        ("k8s-research.llama-ft", "llama-ft", "pod", "research")
    }
    info = resolver.info_labels["k8s-research.llama-ft"]
    assert info == {
        "pod": "llama-ft-worker-0,llama-ft-worker-1",
        "pod_uid": f"{UID_0},{UID_1}",
        "node": "gpu-node-3",
        "owner_kind": "PyTorchJob",
        "owner_name": "llama-ft",
        "job_source": KUBEFLOW,
    }
    assert kubelet.unauthorized == 0


def test_kubelet_going_away_keeps_the_ml_job_and_reports_stale(kubelet, token_file, procs, tmp_path):
    kubelet.pods = [worker(UID_0, 0)]
    poller = KubeletPoller(
        KubeletSettings(url=kubelet.url, ca_file=kubelet.ca_file, token_file=token_file, poll_s=60, timeout_s=1.0)
    )
    assert poller.poll_once()
    resolver = JobResolver(Registry(tmp_path), pods=poller)
    process = procs.add(pod_cgroup(UID_0))
    assert resolver.resolve([process])[0].id == "k8s-research.llama-ft"
    assert poller.health().stale is False

    kubelet.stop()
    assert poller.poll_once() is False
    health = poller.health()
    assert (health.up, health.stale, health.errors_total, health.pods) == (False, True, 1, 1)
    assert resolver.resolve([process])[0].id == "k8s-research.llama-ft"


def test_a_pod_without_metadata_asks_for_an_early_poll(kubelet, token_file, procs, tmp_path):
    poller = KubeletPoller(KubeletSettings(url=kubelet.url, ca_file=kubelet.ca_file, token_file=token_file, poll_s=600))
    poller.start()
    try:
        assert poller.first_poll.wait(10)
        assert kubelet.requests == 1
        kubelet.pods = [pod_item(UID_2, "eval-0", "research", {"jobset.sigs.k8s.io/jobset-name": "nightly-eval"})]
        resolver = JobResolver(Registry(tmp_path), pods=poller)
        process = procs.add(pod_cgroup(UID_2))
        assert resolver.resolve([process])[0].id == f"pod-{UID_2}"
        # The regular poll is ten minutes away: only the early poll can bring the metadata.
        wait_until(lambda: poller.pod(UID_2) is not None, timeout_s=15, what="an early kubelet poll")
        assert resolver.resolve([process])[0].id == "k8s-research.nightly-eval"
        resolver.resolve([process])
        assert kubelet.requests == 2  # once per unknown pod, not once per tick
    finally:
        poller.stop()


def test_configured_label_list_is_used(kubelet, token_file, procs, tmp_path):
    kubelet.pods = [pod_item(UID_0, "w-0", "ml", {KUBEFLOW: "llama-ft", "team.example.com/run": "run-7"})]
    poller = KubeletPoller(KubeletSettings(url=kubelet.url, ca_file=kubelet.ca_file, token_file=token_file))
    assert poller.poll_once()
    resolver = JobResolver(Registry(tmp_path), pods=poller, pod_job_labels=("team.example.com/run",))
    job = resolver.resolve([procs.add(pod_cgroup(UID_0))])[0]
    assert (job.id, job.name) == ("k8s-ml.run-7", "run-7")


def test_slurm_name_and_user_come_from_the_tasks_environment(procs, tmp_path):
    resolver = JobResolver(Registry(tmp_path))
    job_cgroup = "/system.slice/slurmstepd.scope/job_4242"
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "bert-pretrain", "SLURM_JOB_USER": "alice"}
    stepd = procs.add(f"{job_cgroup}/step_0/slurm")  # slurmstepd: no job environment
    task = procs.add(f"{job_cgroup}/step_0/user/task_0", env)
    # Another job's environment leaked into this cgroup must not rename it.
    stray = procs.add("/system.slice/slurmstepd.scope/job_77/step_0/user/task_0", {**env, "SLURM_JOB_NAME": "x"})
    jobs = resolver.resolve([stepd, task, stray])
    assert [(j.id, j.name, j.kind) for j in jobs] == [("slurm-4242", "bert-pretrain", "slurm")] * 2 + [
        ("slurm-77", "77", "slurm")
    ]
    assert resolver.info_labels == {"slurm-4242": {"user": "alice"}, "slurm-77": {}}

    # One name per job id: a later task with a different SLURM_JOB_NAME does not rename the job.
    late = procs.add(f"{job_cgroup}/step_1/user/task_0", {**env, "SLURM_JOB_NAME": "renamed"})
    assert {j.name for j in resolver.resolve([stepd, task, late])} == {"bert-pretrain"}


def test_kubelet_health_is_exported_from_the_snapshot_only_when_configured():
    health = KubeletHealth(up=False, stale=True, errors_total=3, last_success_unix_s=1_700_000_123.5, pods=4)
    snapshot = replace(EMPTY_SNAPSHOT, health=Health(ticks=7, kubelet=health))
    samples = parse_metrics(render_snapshot(snapshot).decode())
    assert metric_sum(samples, "jouleward_kubelet_up") == 0.0
    assert metric_sum(samples, "jouleward_kubelet_metadata_stale") == 1.0
    assert metric_sum(samples, "jouleward_kubelet_errors_total") == 3.0
    assert metric_sum(samples, "jouleward_kubelet_last_success_timestamp_seconds") == 1_700_000_123.5
    plain = parse_metrics(render_snapshot(EMPTY_SNAPSHOT).decode())
    assert not [name for name, _, _ in plain if name.startswith("jouleward_kubelet_")]
