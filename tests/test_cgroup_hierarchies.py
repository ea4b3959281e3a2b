"""Which job a process's ``/proc/<pid>/cgroup`` names, on hybrid hosts (v1
controllers beside a ``0::`` line) and under incidental systemd scopes.
The cgroup files are fixtures as the kernel writes them
(``tests/fixtures/proc/<case>/cgroup``); the environment is written here."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.model import ProcessKey
from agent.workloads.procfs import ProcessFacts, ScannedProcess
from agent.workloads.registry import Registry
from agent.workloads.resolve import JobResolver

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "proc"
EXCLUDE = ("init.scope", "session-*.scope", "user@*.service")


def resolve(tmp_path: Path, case: str, environ: dict[str, str] | None = None):
    directory = tmp_path / case
    shutil.copytree(FIXTURES / case, directory)
    (directory / "environ").write_bytes(
        b"".join(f"{k}={v}".encode() + b"\0" for k, v in {"PATH": "/bin", **(environ or {})}.items())
    )
    process = ScannedProcess(ProcessKey(4000, 1), 1, 0.1, ProcessFacts(str(directory)))
    job = JobResolver(Registry(tmp_path), unit_exclude=EXCLUDE).resolve([process])[0]
    return job and (job.id, job.kind)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        # Slurm's v1 cgroup plugin: the job is in the controllers, the 0:: line names only slurmd.
        ("slurm-hybrid", ("slurm-4242", "slurm")),
        ("slurm-hybrid-stepd", ("slurm-4243", "slurm")),
        # A v1 (cgroupfs driver) kubelet: the pod is in the controllers, 0:: names containerd.
        ("kubepods-hybrid", ("pod-5d1f3a2b-0000-4c1d-8e2f-000000000000", "pod")),
        ("system-service", ("systemd-vllm.service", "systemd")),
        ("docker-scope", ("systemd-docker-" + "0123456789abcdef" * 4 + ".scope", "systemd")),
    ],
)
def test_every_hierarchy_is_tried_for_pods_and_slurm_before_systemd(tmp_path, case, expected):
    assert resolve(tmp_path, case) == expected


@pytest.mark.parametrize("case", ["tmux-scope", "docker-scope"])
def test_an_explicit_label_beats_an_incidental_scope(tmp_path, case):
    assert resolve(tmp_path, case, {"JOULEWARD_JOB": "llama-ft"}) == ("env-llama-ft", "env")


def test_without_a_label_a_user_scope_is_still_its_unit_and_a_system_service_beats_a_label(tmp_path):
    assert resolve(tmp_path, "tmux-scope")[1] == "systemd"
    assert resolve(tmp_path, "system-service", {"JOULEWARD_JOB": "x"}) == ("systemd-vllm.service", "systemd")
    # The orchestrators' own ids still beat a label.
    assert resolve(tmp_path, "slurm-hybrid", {"JOULEWARD_JOB": "x"}) == ("slurm-4242", "slurm")
