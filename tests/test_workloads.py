"""Process scan and job resolution against real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.config import JobRule
from agent.model import ProcessKey
from agent.workloads.procfs import ProcessScanner, is_procfs_mount, parse_stat
from agent.workloads.registry import RegistrationError, Registry
from agent.workloads.resolve import JobResolver, job_from_cgroup
from tests.support import BURNER, cpu_seconds

PROC = Path("/proc")


def resolve_all(resolver, scanner):
    scan = scanner.scan()
    jobs = resolver.resolve(scan.processes)
    return {p.key.pid: job for p, job in zip(scan.processes, jobs)}, scan


def test_scan_measures_cpu_time_of_a_real_burner(processes):
    scanner = ProcessScanner(PROC)
    burner = subprocess.Popen([sys.executable, "-c", BURNER, "0.5"])
    processes.append(burner)
    scanner.scan()
    time.sleep(1.0)
    scan = scanner.scan()
    mine = [p for p in scan.processes if p.key.pid == burner.pid]
    assert len(mine) == 1
    assert 0.2 <= mine[0].cpu_s <= 0.8, mine[0].cpu_s
    assert 0.0 < scan.node.utilization_ratio <= 1.0
    assert scan.node.busy_s >= mine[0].cpu_s * 0.8


def test_registered_job_includes_descendants_started_later(processes):
    registry = Registry(PROC)
    resolver = JobResolver(registry)
    scanner = ProcessScanner(PROC)
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "time.sleep(0.5)\n"
            "child = subprocess.Popen(['sleep', '30'])\n"
            "print(child.pid, flush=True)\n"
            "child.wait()",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    processes.append(parent)
    job = registry.register("train", [parent.pid], {"team": "nlp"})
    registry.confirm(job)  # the daemon confirms once the ledger has stored it
    jobs, _ = resolve_all(resolver, scanner)
    assert jobs[parent.pid].id == job.ref.id
    child_pid = int(parent.stdout.readline())
    jobs, _ = resolve_all(resolver, scanner)
    assert jobs[child_pid].id == job.ref.id
    assert jobs.get(os.getpid()) is None  # the test itself is a host process


def test_reused_pid_does_not_inherit_a_job():
    registry = Registry(PROC)
    key = ProcessKey(os.getpid(), 1)  # same pid, different start time: another process
    registry.keys[key] = "r-old"
    assert (
        registry.job_of(ProcessKey(os.getpid(), parse_stat(Path(f"/proc/{os.getpid()}/stat").read_bytes())[3])) is None
    )


def test_register_rejects_missing_process():
    with pytest.raises(RegistrationError, match="no such process: 4194000"):
        Registry(PROC).register("x", [4194000], {})


def test_job_finishes_when_its_processes_exit(processes):
    registry = Registry(PROC)
    resolver = JobResolver(registry)
    scanner = ProcessScanner(PROC)
    proc = subprocess.Popen(["sleep", "30"])
    processes.append(proc)
    job = registry.register("short", [proc.pid], {})
    registry.confirm(job)
    resolve_all(resolver, scanner)
    proc.kill()
    proc.wait()
    scan = scanner.scan()
    registry.forget_exited(scan.exited)
    assert registry.get(job.ref.id).finished_at is not None
    assert registry.get(job.ref.id).finish_reason == "exited"


def test_environment_label_and_rules(processes):
    labelled = subprocess.Popen(["sleep", "30"], env={**os.environ, "JOULEWARD_JOB": "bert-finetune"})
    ruled = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "--jouleward-test-marker"])
    processes.extend([labelled, ruled])
    resolver = JobResolver(Registry(PROC), rules=(JobRule(name="marked", cmdline=r"--jouleward-test-marker"),))
    jobs, _ = resolve_all(resolver, ProcessScanner(PROC))
    assert (jobs[labelled.pid].id, jobs[labelled.pid].name, jobs[labelled.pid].kind) == (
        "env-bert-finetune",
        "bert-finetune",
        "env",
    )
    assert (jobs[ruled.pid].id, jobs[ruled.pid].kind) == ("rule-marked", "rule")


@pytest.mark.parametrize(
    "path,expected",
    [
        (
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_5f60_7182_93a4_b5c6d7e8f901.slice/"
            "cri-containerd-" + "a" * 64 + ".scope",
            ("pod-1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901", "pod", "a" * 64),
        ),
        (
            "/kubepods/besteffort/pod1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901/" + "b" * 64,
            ("pod-1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901", "pod", "b" * 64),
        ),
        (
            "/kubepods.slice/kubepods-pod1b2c3d4e_5f60_7182_93a4_b5c6d7e8f901.slice/crio-" + "c" * 64 + ".scope",
            ("pod-1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901", "pod", "c" * 64),
        ),
        ("/slurm/uid_1000/job_4242/step_0/user/task_0", ("slurm-4242", "slurm", "")),
        ("/system.slice/slurmstepd.scope/job_77/step_batch/user/task_0", ("slurm-77", "slurm", "")),
        ("/system.slice/triton.service", ("systemd-triton.service", "systemd", "")),
        ("/user.slice/user-1000.slice/session-3.scope", None),
        ("/init.scope", None),
        ("/", None),
    ],
)
def test_job_from_cgroup(path, expected):
    found = job_from_cgroup(path, ("init.scope", "session-*.scope", "user@*.service"))
    if expected is None:
        assert found is None
    else:
        assert (found.ref.id, found.ref.kind, found.container_id) == expected


def test_a_registration_confirmed_while_the_resolver_walks_is_seen_next_tick(processes):
    """The API thread confirms a registration while the sampler is resolving a
    scan that lists the new job's child: the next resolve must judge the child
    again (it once took the new roots as already seen and left it a host process)."""
    parent = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    processes.append(parent)
    child_pid = int(parent.stdout.readline())
    me = os.getpid()

    class ConfirmingMidWalk(Registry):
        pending = None

        def job_of(self, key):
            if key.pid == me and self.pending is not None:
                job, self.pending = self.pending, None
                self.confirm(job)
            return super().job_of(key)

    registry = ConfirmingMidWalk(PROC)
    resolver = JobResolver(registry)
    scan = ProcessScanner(PROC).scan()
    by_pid = {p.key.pid: p for p in scan.processes}
    ordered = [by_pid[parent.pid], by_pid[child_pid], by_pid[me]]  # the child is judged before the confirm
    job = registry.pending = registry.register("train", [parent.pid], {})
    first = resolver.resolve(ordered)
    assert first[1] is None  # judged before the job existed
    again = resolver.resolve(list(ordered))
    assert [ref.id if ref else None for ref in again] == [job.ref.id, job.ref.id, None]


def kept_stat_files(pid: int) -> int:
    """How many of this process's descriptors are open on /proc/<pid>/stat."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == f"/proc/{pid}/stat":
                count += 1
        except OSError:
            pass
    return count


def test_a_real_procfs_keeps_the_stat_files_it_reads_open_and_closes_them_on_exit(processes):
    scanner = ProcessScanner(PROC)
    burner = subprocess.Popen([sys.executable, "-c", BURNER, "0.5"])
    processes.append(burner)
    scanner.scan()
    assert kept_stat_files(burner.pid) == 1
    cpu_before = cpu_seconds(burner.pid)
    time.sleep(1.0)
    # Twice: the second scan may take the steady-state path (the same listing) as well as the full one.
    used = next(p.cpu_s for p in scanner.scan().processes if p.key.pid == burner.pid)
    cpu_between = cpu_seconds(burner.pid)
    used += next(p.cpu_s for p in scanner.scan().processes if p.key.pid == burner.pid)
    cpu_after = cpu_seconds(burner.pid)
    # The burner keeps burning between a scan and the reads beside it: bounded on both sides,
    # not compared with one read taken later (a loaded machine widens that gap).
    assert cpu_between - cpu_before - 0.02 <= used <= cpu_after - cpu_before + 0.05
    assert 0.2 <= used <= 1.0
    assert kept_stat_files(burner.pid) == 1
    key = next(p.key for p in scanner.scan().processes if p.key.pid == burner.pid)
    burner.kill()
    burner.wait()
    scan = scanner.scan()
    assert key in scan.exited and burner.pid not in {p.key.pid for p in scan.processes}
    assert kept_stat_files(burner.pid) == 0


def test_skipped_processes_have_no_stat_file_kept_and_close_releases_them(processes):
    scanner = ProcessScanner(PROC)
    sleepers = [subprocess.Popen(["sleep", "30"]) for _ in range(3)]
    processes.extend(sleepers)
    first = scanner.scan()
    assert [kept_stat_files(s.pid) for s in sleepers] == [1, 1, 1]
    scanner.skip([p for p in first.processes if p.key.pid == sleepers[0].pid])
    scanner.scan()
    assert [kept_stat_files(s.pid) for s in sleepers] == [0, 1, 1]
    scanner.close()
    assert [kept_stat_files(s.pid) for s in sleepers] == [0, 0, 0]
    after = scanner.scan()  # open again, and still measured
    assert {s.pid for s in sleepers} <= {p.key.pid for p in after.processes}
    assert [kept_stat_files(s.pid) for s in sleepers] == [0, 1, 1]


def test_a_fixture_tree_is_not_a_procfs_and_keeps_nothing_open(tmp_path):
    assert is_procfs_mount(PROC)
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    fields = ["S", "1"] + ["0"] * 9 + ["7", "3"] + ["0"] * 6 + ["100", "0", "10"]
    (proc / "4242" / "stat").write_text(f"4242 (fixture) {' '.join(fields)}\n")
    (proc / "stat").write_text("cpu 1 0 1 10 0 0 0 0\n")
    assert not is_procfs_mount(proc)
    scanner = ProcessScanner(proc)
    scan = scanner.scan()
    assert [p.key for p in scan.processes] == [ProcessKey(4242, 100)]
    open_files = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            open_files.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    assert open_files and not [f for f in open_files if f.startswith(str(proc))]


def test_a_skipped_process_registered_is_charged_from_its_registration_not_from_the_scan_after(processes):
    scanner = ProcessScanner(PROC)
    burner = subprocess.Popen([sys.executable, "-c", BURNER, "0.5"])
    processes.append(burner)
    first = scanner.scan()
    (mine,) = [p for p in first.processes if p.key.pid == burner.pid]
    scanner.skip([mine])  # a host process: its stat is not read
    scanner.scan()
    time.sleep(0.3)
    scanner.take_baselines((mine.key,))  # registered now
    at_registration = cpu_seconds(burner.pid)
    time.sleep(0.8)
    scanner.skip([])
    scan = scanner.scan()
    used = next(p.cpu_s for p in scan.processes if p.key.pid == burner.pid)
    assert used == pytest.approx(cpu_seconds(burner.pid) - at_registration, abs=0.05)
    assert 0.2 <= used <= 0.8
    # Used once: the scan after takes its difference from this scan's read.
    time.sleep(0.3)
    again = next(p.cpu_s for p in scanner.scan().processes if p.key.pid == burner.pid)
    assert 0.05 <= again <= 0.4
