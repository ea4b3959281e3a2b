"""Real cgroups: kubepods- and Slurm-shaped cgroup directories with real
processes in them, a real kubelet server on loopback with a bearer token, and
a real agent process reading both."""

from __future__ import annotations

import os
import sys
import uuid

import pytest

from tests.support import BURNER, AgentProcess, metric_sum, metric_values, wait_until
from tests.support.cgroups import Cgroups, pod_dir
from tests.support.kubelet_server import FakeKubelet, pod_item

TOKEN = "kubelet-bearer-token-for-tests"
KUBEFLOW = "training.kubeflow.org/job-name"
RUN_UID = "5d0c7f8e-3b2a-4e61-9f70-8a1b2c3d4e5f"  # the PyTorchJob's UID: the run's identity
JOB = f"k8s-{RUN_UID}"


@pytest.fixture
def cgroups():
    if os.geteuid() != 0:
        pytest.skip("creating cgroups needs root")
    groups = Cgroups()
    yield groups
    groups.cleanup()


def job_samples(samples, name, job_id, **match):
    return metric_values(samples, name, job_id=job_id, **match)


def test_pods_and_slurm_jobs_in_real_cgroups(tmp_path, cgroups, agents):
    uid_0, uid_1, uid_late = (str(uuid.uuid4()) for _ in range(3))
    kubelet = FakeKubelet(
        TOKEN,
        [
            pod_item(
                uid,
                f"llama-ft-worker-{i}",
                "research",
                {KUBEFLOW: "llama-ft"},
                node="gpu-node-3",
                owner=("PyTorchJob", "llama-ft", RUN_UID),
            )
            for i, uid in enumerate((uid_0, uid_1))
        ],
    )
    kubelet_running = True
    try:
        burn = [sys.executable, "-c", BURNER, "0.15"]
        cgroups.spawn(pod_dir(uid_0), burn)
        cgroups.spawn(pod_dir(uid_1), burn)
        late = cgroups.spawn(pod_dir(uid_late), burn)  # a pod the kubelet does not list yet
        slurm_env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "bert-pretrain", "SLURM_JOB_USER": "alice"}
        cgroups.spawn("slurm/uid_0/job_4242/step_0/user/task_0", burn, slurm_env)
        cgroups.spawn("slurm/uid_0/job_4242/step_0/slurm", ["sleep", "120"])  # no job environment, like slurmstepd

        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        config = tmp_path / "agent.toml"
        config.write_text(f"""
[agent]
kubelet_enabled = true
kubelet_url = "{kubelet.url}"
kubelet_ca_file = "{kubelet.ca_file}"
kubelet_token_file = "{token_file}"
kubelet_poll_s = 1
kubelet_timeout_s = 1
""")
        agent = AgentProcess(tmp_path / "state", sysfs=tmp_path / "nosys", config=config, interval_s=0.25)
        agents.append(agent)

        # Two pods of one training job: one job, with the namespace, both pods on the info metric.
        def training_job_seen():
            samples = agent.metrics()
            found = job_samples(samples, "jouleward_job_processes", JOB)
            return samples if found and found[0][1] == 2 else None

        samples = wait_until(training_job_seen, timeout_s=30, what="both pods under one job")
        ((labels, _),) = job_samples(samples, "jouleward_job_processes", JOB)
        assert (labels["job_name"], labels["job_kind"], labels["job_namespace"]) == ("llama-ft", "pod", "research")
        ((info, _),) = job_samples(samples, "jouleward_job_info", JOB)
        assert info["label_pod"] == "llama-ft-worker-0,llama-ft-worker-1"
        assert set(info["label_pod_uid"].split(",")) == {uid_0, uid_1}
        assert (info["label_node"], info["label_owner_kind"], info["label_job_source"]) == (
            "gpu-node-3",
            "PyTorchJob",
            KUBEFLOW,
        )
        for name in ("jouleward_job_energy_joules_total", "jouleward_job_cpu_seconds_total"):
            assert all("label_pod" not in l and "pod" not in l for l, _ in metric_values(samples, name))
        assert metric_sum(samples, "jouleward_kubelet_up") == 1.0
        assert metric_sum(samples, "jouleward_kubelet_metadata_stale") == 0.0

        # The unlisted pod is its own job, keyed by UID.
        late_job = f"pod-{uid_late}"
        wait_until(
            lambda: metric_sum(agent.metrics(), "jouleward_job_energy_joules_total", job_id=late_job) > 0,
            timeout_s=30,
            what="energy for the pod without metadata",
        )

        # Slurm: the name and user from the task's environment, both processes in the job.
        ((slurm, processes),) = job_samples(samples, "jouleward_job_processes", "slurm-4242")
        assert (slurm["job_name"], slurm["job_kind"], processes) == ("bert-pretrain", "slurm", 2.0)
        ((slurm_info, _),) = job_samples(samples, "jouleward_job_info", "slurm-4242")
        assert slurm_info["label_user"] == "alice"

        # Metadata for the late pod arrives: its processes move to their ML job; what the UID job
        # already booked stays there, and its counter never goes backwards.
        booked_before = metric_sum(agent.metrics(), "jouleward_job_energy_joules_total", job_id=late_job)
        kubelet.pods = kubelet.pods + [
            pod_item(uid_late, "eval-0", "research", {"jobset.sigs.k8s.io/jobset-name": "nightly-eval"})
        ]
        wait_until(
            lambda: metric_sum(agent.metrics(), "jouleward_job_processes", job_id="k8s-research.nightly-eval") == 1,
            timeout_s=30,
            what="the late pod under its ML job",
        )
        wait_until(
            lambda: metric_sum(agent.metrics(), "jouleward_job_finished", job_id=late_job) == 1,
            timeout_s=30,
            what="the UID-keyed job to finish",
        )
        samples = agent.metrics()
        assert metric_sum(samples, "jouleward_job_energy_joules_total", job_id=late_job) >= booked_before > 0
        assert late.poll() is None

        # The kubelet goes away: metadata is kept, attribution carries on, health says stale.
        kubelet.stop()
        kubelet_running = False
        wait_until(
            lambda: metric_sum(agent.metrics(), "jouleward_kubelet_metadata_stale") == 1.0,
            timeout_s=30,
            what="stale kubelet metadata",
        )
        before = agent.metrics()
        assert metric_sum(before, "jouleward_kubelet_up") == 0.0
        assert metric_sum(before, "jouleward_kubelet_errors_total") >= 1
        last_success = metric_sum(before, "jouleward_kubelet_last_success_timestamp_seconds")
        assert last_success > 1.6e9
        energy_before = metric_sum(before, "jouleward_job_energy_joules_total", job_id=JOB)
        cpu_before = metric_sum(before, "jouleward_job_cpu_seconds_total", job_id=JOB)
        agent.wait_ticks(8)
        after = agent.metrics()
        assert metric_sum(after, "jouleward_job_processes", job_id=JOB) == 2
        assert metric_sum(after, "jouleward_job_energy_joules_total", job_id=JOB) > energy_before
        assert metric_sum(after, "jouleward_job_cpu_seconds_total", job_id=JOB) > cpu_before
        assert metric_sum(after, "jouleward_kubelet_last_success_timestamp_seconds") == last_success
        assert metric_sum(after, "jouleward_kubelet_metadata_stale") == 1.0
    finally:
        if kubelet_running:
            kubelet.stop()
