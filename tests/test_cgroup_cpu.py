"""CPU time of cgroup-defined jobs from their cgroups' own counters.

Fixture trees (``<sysfs>/fs/cgroup`` and a ``/proc`` written here, with the
counters a test sets) cover v1, v2 and hybrid layouts, resets, nesting and a
cgroup that disappears, through the daemon's own tick. Real cgroup v2
directories with real processes show the short-lived case: a pod running 300
processes of about 40 ms CPU each is charged what they used.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest

from agent.config import Config
from agent.model import JobRef, ProcessKey
from agent.pipeline.daemon import Agent
from agent.workloads.cgroupcpu import (
    UNIFIED,
    CgroupCounter,
    CgroupCpuReader,
    charged_ns,
    nearest_counted_ancestors,
    parse_usage_ns,
)
from agent.workloads.procfs import CLK_TCK, ProcessScanner
from agent.workloads.resolve import counter_of
from tests.support import AgentProcess, metric_sum, wait_until
from tests.support.cgroups import Cgroups

POD_A = "5d1f3a2b-0000-4c1d-8e2f-00000000000a"
POD_B = "5d1f3a2b-0000-4c1d-8e2f-00000000000b"
CONTAINER = "c" * 64


# -- pure parts ------------------------------------------------------------------------
def test_counter_values_and_charges():
    assert parse_usage_ns(UNIFIED, b"usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n") == 1_500_000
    assert parse_usage_ns("cpu,cpuacct", b"2500000000\n") == 2_500_000_000
    assert parse_usage_ns(UNIFIED, b"garbage\n") is None
    assert charged_ns(None, (7, 10**9), born=False) == 0  # first sight: a baseline
    assert charged_ns(None, (7, 10**9), born=True) == 10**9  # a new cgroup: all of it
    assert charged_ns((7, 10**9), (7, 3 * 10**9), born=False) == 2 * 10**9
    assert charged_ns((7, 10**9), (7, 4 * 10**8), born=False) == 4 * 10**8  # lower: made again
    assert charged_ns((7, 10**9), (8, 2 * 10**9), born=False) == 2 * 10**9  # another inode: made again


def test_nested_counters_find_their_nearest_counted_ancestor():
    outer = CgroupCounter(UNIFIED, "/system.slice/app.service")
    middle = CgroupCounter(UNIFIED, "/system.slice/app.service/a.slice")
    inner = CgroupCounter(UNIFIED, "/system.slice/app.service/a.slice/worker.scope")
    other_tree = CgroupCounter("cpu,cpuacct", "/system.slice/app.service/a.slice")
    sibling = CgroupCounter(UNIFIED, "/system.slice/app.service2")
    assert nearest_counted_ancestors([outer, middle, inner, other_tree, sibling]) == {middle: outer, inner: middle}


@pytest.mark.parametrize(
    ("lines", "job_id", "expected"),
    [
        # v2, containerd with the cgroupfs driver: the pod's cgroup, not the container's.
        (
            ((UNIFIED, f"/kubepods/burstable/pod{POD_A}/{CONTAINER}"),),
            f"pod-{POD_A}",
            CgroupCounter(UNIFIED, f"/kubepods/burstable/pod{POD_A}"),
        ),
        # v2, the systemd driver.
        (
            (
                (
                    UNIFIED,
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
                    f"{POD_A.replace('-', '_')}.slice/cri-containerd-{CONTAINER}.scope",
                ),
            ),
            f"pod-{POD_A}",
            CgroupCounter(
                UNIFIED,
                f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_A.replace('-', '_')}.slice",
            ),
        ),
        # Hybrid: 0:: names slurmd; the cpu,cpuacct hierarchy holds the job, whose steps it covers.
        (
            (
                (UNIFIED, "/system.slice/slurmd.service"),
                ("memory", "/slurm/uid_1000/job_4242/step_0/task_0"),
                ("cpu,cpuacct", "/slurm/uid_1000/job_4242/step_0/task_0"),
            ),
            "slurm-4242",
            CgroupCounter("cpu,cpuacct", "/slurm/uid_1000/job_4242"),
        ),
        # Hybrid with no cpuacct line naming the pod: no counter, the processes' own CPU time.
        (
            ((UNIFIED, "/system.slice/containerd.service"), ("memory", f"/kubepods/burstable/pod{POD_A}/x")),
            f"pod-{POD_A}",
            None,
        ),
        (
            ((UNIFIED, "/system.slice/vllm.service"),),
            "systemd-vllm.service",
            CgroupCounter(UNIFIED, "/system.slice/vllm.service"),
        ),
    ],
)
def test_a_jobs_counter_is_its_top_cgroup_in_a_hierarchy_that_counts_cpu(lines, job_id, expected):
    assert counter_of(lines, job_id) == expected


# -- fixture trees through the daemon's tick ---------------------------------------------
class Host:
    """A fixture ``/proc`` and ``/sys`` (RAPL and cgroups) whose counters a test moves."""

    def __init__(self, root: Path, layout: str) -> None:
        self.proc = root / "proc"
        self.sys = root / "sys"
        self.cgroup = self.sys / "fs" / "cgroup"
        self.layout = layout  # "v2", "v1" or "hybrid"
        self.proc.mkdir(parents=True)
        self.busy_ticks = 0
        self.energy_uj = 1_000_000
        self.package = self.sys / "class/powercap/intel-rapl:0"
        self.package.mkdir(parents=True)
        (self.package / "name").write_text("package-0\n")
        (self.package / "max_energy_range_uj").write_text("262143328850\n")
        if layout in ("v2", "hybrid"):
            unified = self.cgroup / "unified" if layout == "hybrid" else self.cgroup
            unified.mkdir(parents=True)
            (unified / "cgroup.controllers").write_text("cpu memory pids\n")
        if layout in ("v1", "hybrid"):
            (self.cgroup / "cpu,cpuacct").mkdir(parents=True)
            (self.cgroup / "cpu,cpuacct" / "cpuacct.usage").write_text("0\n")
        self.advance(0.0, 0)

    def _dir(self, path: str) -> Path:
        if self.layout == "v2":
            return self.cgroup / path.lstrip("/")
        if self.layout == "hybrid":
            return self.cgroup / "cpu,cpuacct" / path.lstrip("/")  # the job in v1, 0:: names containerd
        return self.cgroup / "cpu,cpuacct" / path.lstrip("/")

    def set_cgroup_cpu(self, path: str, seconds: float) -> None:
        directory = self._dir(path)
        directory.mkdir(parents=True, exist_ok=True)
        if self.layout == "v2":
            usec = round(seconds * 1e6)
            (directory / "cpu.stat").write_text(f"usage_usec {usec}\nuser_usec {usec}\nsystem_usec 0\n")
        else:
            (directory / "cpuacct.usage").write_text(f"{round(seconds * 1e9)}\n")

    def remove_cgroup(self, path: str) -> None:
        shutil.rmtree(self._dir(path))

    def process(self, pid: int, cgroup: str, cpu_s: float = 0.0, start_ticks: int = 1) -> None:
        directory = self.proc / str(pid)
        directory.mkdir(exist_ok=True)
        if self.layout == "v2":
            lines = f"0::{cgroup}\n"
        elif self.layout == "v1":
            lines = f"4:memory:{cgroup}\n3:cpu,cpuacct:{cgroup}\n1:name=systemd:{cgroup}\n"
        else:
            # The 0:: line names the unit a process is in; a pod (cgroupfs driver) is only in the v1 lines.
            unified = "/system.slice/containerd.service" if "kubepods" in cgroup else cgroup
            lines = f"4:memory:{cgroup}\n3:cpu,cpuacct:{cgroup}\n0::{unified}\n"
        (directory / "cgroup").write_text(lines)
        self.set_process_cpu(pid, cpu_s, start_ticks)

    def set_process_cpu(self, pid: int, cpu_s: float, start_ticks: int = 1) -> None:
        ticks = round(cpu_s * CLK_TCK)
        fields = ["S", "1"] + ["0"] * 9 + [str(ticks), "0"] + ["0"] * 6 + [str(start_ticks), "0", "10"] + ["0"] * 30
        (self.proc / str(pid) / "stat").write_text(f"{pid} (worker) " + " ".join(fields) + "\n")

    def exit(self, pid: int) -> None:
        shutil.rmtree(self.proc / str(pid))

    def advance(self, busy_s: float, energy_j: float) -> None:
        """The node was busy ``busy_s`` CPU-seconds and the package drew ``energy_j``."""
        self.busy_ticks += round(busy_s * CLK_TCK)
        idle = 10**6
        (self.proc / "stat").write_text(f"cpu  {self.busy_ticks} 0 0 {idle} 0 0 0 0 0 0\n")
        self.energy_uj += round(energy_j * 1e6)
        (self.package / "energy_uj").write_text(f"{self.energy_uj}\n")


def boot_ticks_now() -> int:
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * CLK_TCK)


def make_agent(host: Host, tmp_path: Path) -> Agent:
    config = dataclasses.replace(
        Config(),
        procfs=host.proc,
        sysfs=host.sys,
        state_dir=tmp_path / "state",
        idle_power_w={"cpu": 0.0},
        flush_interval_s=3600.0,
    )
    return Agent(config)


def job_cpu_s(agent: Agent, job_id: str) -> float:
    view = agent.ledger.job(job_id)
    return view.totals.cpu_s if view else 0.0


def job_energy_j(agent: Agent, job_id: str) -> float:
    view = agent.ledger.job(job_id)
    return view.totals.energy_j.get("cpu", 0.0) if view else 0.0


def pod(uid: str, container: str = CONTAINER) -> str:
    return f"/kubepods/burstable/pod{uid}/{container}"


@pytest.mark.parametrize("layout", ["v2", "v1", "hybrid"])
def test_a_pod_is_charged_its_cgroups_counter_through_the_tick(tmp_path, layout):
    host = Host(tmp_path, layout)
    pod_a = f"/kubepods/burstable/pod{POD_A}"
    host.set_cgroup_cpu(pod_a, 100.0)
    host.process(101, pod(POD_A), cpu_s=50.0)
    host.process(102, pod(POD_A, "d" * 64), cpu_s=40.0)  # a second container: the same pod cgroup
    host.process(200, "/system.slice/sshd.service", cpu_s=5.0)  # a systemd unit with no counter written
    host.process(300, "/user.slice", cpu_s=1.0)  # the host
    agent = make_agent(host, tmp_path)
    agent.tick()
    host.advance(8.0, 80.0)
    agent.tick()  # both baselines: nothing from before the agent's first look
    assert job_cpu_s(agent, f"pod-{POD_A}") == 0.0

    # The pod's processes show 0.5 s between them (the rest ran in processes too short to be seen);
    # the pod's counter says 3 s. The node was busy 4 s, and the package drew 40 J.
    host.set_process_cpu(101, 50.3)
    host.set_process_cpu(102, 40.2)
    host.set_cgroup_cpu(pod_a, 103.0)
    host.set_process_cpu(200, 5.5)  # the unit's cgroup has no counter here: its processes' own CPU time
    host.advance(4.0, 40.0)
    agent.tick()
    assert job_cpu_s(agent, f"pod-{POD_A}") == pytest.approx(3.0)
    assert job_cpu_s(agent, "systemd-sshd.service") == pytest.approx(0.5)
    assert job_energy_j(agent, f"pod-{POD_A}") == pytest.approx(40.0 * 3.0 / 4.0)
    assert job_energy_j(agent, "systemd-sshd.service") == pytest.approx(40.0 * 0.5 / 4.0)
    snapshot = agent.snapshot
    assert snapshot.unattributed_j["cpu"] == pytest.approx(80.0 + 40.0 * 0.5 / 4.0)  # the baseline tick, then the rest
    assert snapshot.health.processes == 4

    # From now on the pod's processes and the host's are not read: a stat that stops parsing changes nothing.
    (host.proc / "101" / "stat").write_text("")
    (host.proc / "300" / "stat").write_text("")
    host.set_cgroup_cpu(pod_a, 105.0)
    host.advance(2.0, 10.0)
    agent.tick()
    assert job_cpu_s(agent, f"pod-{POD_A}") == pytest.approx(5.0)
    assert agent.ledger.job(f"pod-{POD_A}").processes == 2
    assert agent.snapshot.health.processes == 4
    # The counter (2 s) is all the node was busy: the pod has all the active energy, nothing is left over.
    assert job_energy_j(agent, f"pod-{POD_A}") == pytest.approx(30.0 + 10.0)
    agent.close()


def test_reset_new_pods_exits_and_a_cgroup_that_disappears(tmp_path):
    host = Host(tmp_path, "v2")
    pod_a, pod_b = f"/kubepods/burstable/pod{POD_A}", f"/kubepods/burstable/pod{POD_B}"
    host.set_cgroup_cpu(pod_a, 10.0)
    host.process(101, pod(POD_A))
    agent = make_agent(host, tmp_path)
    agent.tick()
    host.advance(1.0, 1.0)
    agent.tick()

    # Pod A's cgroup is removed and made again (pod restarted in place): the new counter is all new.
    host.remove_cgroup(pod_a)
    host.set_cgroup_cpu(pod_a, 0.75)
    # Pod B appears with its process started after the last scan: its whole counter is this tick's.
    host.set_cgroup_cpu(pod_b, 1.5)
    host.process(201, pod(POD_B), start_ticks=boot_ticks_now() + 1)
    host.advance(3.0, 30.0)
    agent.tick()
    assert job_cpu_s(agent, f"pod-{POD_A}") == pytest.approx(0.75)
    assert job_cpu_s(agent, f"pod-{POD_B}") == pytest.approx(1.5)

    # Pod B's process exits; its cgroup is read once more and what it counted since the last read is B's.
    host.exit(201)
    host.set_cgroup_cpu(pod_b, 2.0)
    host.set_cgroup_cpu(pod_a, 1.0)
    host.advance(1.0, 10.0)
    agent.tick()
    assert job_cpu_s(agent, f"pod-{POD_B}") == pytest.approx(2.0)
    assert job_energy_j(agent, f"pod-{POD_B}") == pytest.approx(30.0 * 1.5 / 3.0 + 10.0 * 0.5 / 1.0)

    # Pod A's cgroup disappears between two ticks (its process too): what it did after the last read is lost.
    host.exit(101)
    host.remove_cgroup(pod_a)
    host.advance(1.0, 10.0)
    agent.tick()
    assert job_cpu_s(agent, f"pod-{POD_A}") == pytest.approx(1.0)
    host.advance(1.0, 10.0)
    agent.tick()
    assert job_cpu_s(agent, f"pod-{POD_B}") == pytest.approx(2.0)  # read once after the exit, not again
    # The baseline tick, the new pods' tick, the exit's, then two ticks with no job at all.
    assert agent.snapshot.unattributed_j["cpu"] == pytest.approx(1.0 + 30.0 * 0.75 / 3.0 + 10.0 * 0.25 + 10.0 + 10.0)
    agent.close()


def test_nested_cgroups_and_per_process_jobs_inside_are_not_counted_twice(tmp_path):
    host = Host(tmp_path, "v2")
    outer, inner = "/system.slice/app.service", "/system.slice/app.service/worker.scope"
    host.set_cgroup_cpu(outer, 10.0)
    host.set_cgroup_cpu(inner, 4.0)
    host.process(101, outer + "/main")  # the unit's own process, in a leaf below it
    host.process(102, inner)  # a scope of its own inside the unit
    host.process(103, outer + "/main", cpu_s=1.0)  # registered below: its CPU is its job's, not the unit's
    agent = make_agent(host, tmp_path)
    agent.register_job("train", [103], {})
    agent.tick()
    host.advance(1.0, 1.0)
    agent.tick()
    registered = agent.registry.job_of(ProcessKey(103, 1))
    assert registered is not None

    host.set_cgroup_cpu(outer, 16.0)  # +6 s, of which +2 s in the scope and +1.5 s the registered process
    host.set_cgroup_cpu(inner, 6.0)
    host.set_process_cpu(103, 2.5)
    host.advance(6.0, 60.0)
    agent.tick()
    assert job_cpu_s(agent, "systemd-worker.scope") == pytest.approx(2.0)
    assert job_cpu_s(agent, "systemd-app.service") == pytest.approx(6.0 - 2.0 - 1.5)
    assert job_cpu_s(agent, registered) == pytest.approx(1.5)
    total = sum(job_energy_j(agent, job) for job in ("systemd-worker.scope", "systemd-app.service", registered))
    assert total == pytest.approx(60.0)
    agent.close()


def test_counters_ahead_of_proc_stat_never_attribute_more_than_measured(tmp_path):
    host = Host(tmp_path, "v2")
    pod_a = f"/kubepods/burstable/pod{POD_A}"
    host.set_cgroup_cpu(pod_a, 1.0)
    host.process(101, pod(POD_A))
    host.process(102, "/user.slice/x", cpu_s=1.0)
    agent = make_agent(host, tmp_path)
    agent.register_job("eval", [102], {})
    agent.tick()
    host.advance(1.0, 1.0)
    agent.tick()
    # Read after /proc/stat: the counters say 3 s + 1 s against a node busy 2.5 s.
    host.set_cgroup_cpu(pod_a, 4.0)
    host.set_process_cpu(102, 2.0)
    host.advance(2.5, 25.0)
    agent.tick()
    registered = agent.registry.job_of(ProcessKey(102, 1))
    assert job_energy_j(agent, f"pod-{POD_A}") == pytest.approx(25.0 * 3.0 / 4.0)
    assert job_energy_j(agent, registered) == pytest.approx(25.0 * 1.0 / 4.0)
    totals = agent.ledger.read()
    measured = sum(d.energy_j for d in totals.devices if d.domain == "cpu")
    jobs = sum(v.totals.energy_j.get("cpu", 0.0) for v in totals.jobs)
    assert totals.unattributed_j["cpu"] == pytest.approx(1.0)  # only the second tick's
    assert totals.idle_j["cpu"] + totals.unattributed_j["cpu"] + jobs == pytest.approx(measured)
    assert measured == pytest.approx(26.0)
    agent.close()


def test_reader_reads_each_counter_once_per_tick_and_forgets_gone_ones(tmp_path):
    host = Host(tmp_path, "v1")
    pod_a = CgroupCounter("cpu,cpuacct", f"/kubepods/burstable/pod{POD_A}")
    host.set_cgroup_cpu(pod_a.path, 1.0)
    reader = CgroupCpuReader(host.sys)
    ref = JobRef(f"pod-{POD_A}", POD_A, "pod")
    assert reader.read({pod_a: ref}).job_cpu_s == {ref.id: 0.0}
    host.set_cgroup_cpu(pod_a.path, 1.25)
    first = reader.read({pod_a: ref})
    assert first.job_cpu_s == {ref.id: pytest.approx(0.25)} and first.readable == {pod_a}
    host.set_cgroup_cpu(pod_a.path, 2.0)
    last = reader.read({})  # no process left: one last read
    assert last.job_cpu_s == {ref.id: pytest.approx(0.75)} and last.ended == {ref.id: ref}
    host.set_cgroup_cpu(pod_a.path, 3.0)
    assert reader.read({}).job_cpu_s == {}
    missing = CgroupCounter("cpu,cpuacct", "/kubepods/burstable/podnothing")
    assert reader.read({missing: ref}).readable == frozenset()


def test_the_steady_state_reads_only_processes_not_skipped_and_notices_a_reused_pid(tmp_path):
    host = Host(tmp_path, "v2")
    host.process(300, "/user.slice/x", cpu_s=1.0)
    host.process(301, "/user.slice/y", cpu_s=1.0)
    scanner = ProcessScanner(host.proc)
    scanner.scan()
    first = scanner.scan()
    scanner.skip([p for p in first.processes if p.key.pid == 301])
    scanner.scan()  # the skip changed: a full scan
    host.set_process_cpu(300, 1.5)
    host.set_process_cpu(301, 9.0)
    steady = scanner.scan()
    cpu = {p.key.pid: p.cpu_s for p in steady.processes}
    assert cpu == {300: pytest.approx(0.5), 301: 0.0}
    # Pid 300 exits and the number comes back for a new process: the steady state notices.
    host.exit(300)
    host.process(300, "/user.slice/x", cpu_s=0.25, start_ticks=boot_ticks_now() + 1)
    reused = scanner.scan()
    ((new,),) = [[p for p in reused.processes if p.key.pid == 300]]
    assert new.key.start_ticks > 1 and new.cpu_s == pytest.approx(0.25)  # born since the last scan: all of it
    assert reused.exited == [ProcessKey(300, 1)]


# -- real cgroups, real processes -----------------------------------------------------------
BURST = r"""
import os, resource, sys, time
ready, go = sys.argv[1], sys.argv[2]
children, cpu_each_s = int(sys.argv[3]), float(sys.argv[4])
with open(ready, "w") as f:
    f.write("ready")
with open(go) as f:  # a FIFO: blocks, using no CPU, until the test opens it
    f.read()
running = 0
for _ in range(children):
    pid = os.fork()
    if pid == 0:
        start = time.process_time()
        while time.process_time() - start < cpu_each_s:
            pass
        os._exit(0)
    running += 1
    if running >= 2:
        os.wait()
        running -= 1
while running:
    os.wait()
    running -= 1
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
with open(ready + ".done", "w") as f:
    f.write(f"{kids.ru_utime + kids.ru_stime} {me.ru_utime + me.ru_stime}")
time.sleep(600)
"""


@pytest.fixture
def v2_cgroups():
    if os.geteuid() != 0:
        pytest.skip("creating cgroups needs root")
    groups = Cgroups()
    if not (groups.mount / "cgroup.controllers").exists():
        groups.cleanup()
        pytest.skip(f"the cgroup made here is a v1 one ({groups.mount}): this test needs cgroup v2")
    yield groups
    groups.cleanup()


def test_a_burst_of_short_processes_in_a_real_pod_is_charged_in_full(tmp_path, v2_cgroups, processes):
    uid = str(uuid.uuid4())
    # The agent's cgroup fs is the real one: <sysfs>/fs/cgroup -> the directory that holds the v2 mount.
    sysfs = tmp_path / "sys"
    (sysfs / "fs").mkdir(parents=True)
    mount = v2_cgroups.mount
    (sysfs / "fs" / "cgroup").symlink_to(mount.parent if mount.name == "unified" else mount)
    config = dataclasses.replace(
        Config(), procfs=Path("/proc"), sysfs=sysfs, state_dir=tmp_path / "state", flush_interval_s=3600.0
    )
    agent = Agent(config)
    ready, go = tmp_path / "ready", tmp_path / "go"
    os.mkfifo(go)
    launcher = v2_cgroups.spawn(
        f"kubepods/burstable/pod{uid}/{uuid.uuid4().hex * 2}",
        [sys.executable, "-c", BURST, str(ready), str(go), "300", "0.04"],
    )
    processes.append(launcher)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline, "the launcher did not start"
        time.sleep(0.05)
    time.sleep(0.2)
    job = f"pod-{uid}"
    agent.tick()
    agent.tick()  # the launcher is known and its pod's counter has a baseline
    launcher_before_s = _process_cpu_s(launcher.pid)
    charged_before = job_cpu_s(agent, job)
    per_process = ProcessScanner(Path("/proc"))  # what summing the processes' own CPU time would charge
    per_process.scan()
    per_process_s = 0.0
    with open(go, "w") as fifo:
        fifo.write("go")
    done = Path(str(ready) + ".done")
    deadline = time.monotonic() + 120
    while not done.exists():
        assert time.monotonic() < deadline, "the burst did not finish"
        time.sleep(0.25)
        per_process_s += sum(p.cpu_s for p in per_process.scan().processes if uid in p.facts.cgroup)
        agent.tick()
    per_process_s += sum(p.cpu_s for p in per_process.scan().processes if uid in p.facts.cgroup)
    agent.tick()
    children_s, launcher_s = (float(v) for v in done.read_text().split())
    true_s = children_s + (launcher_s - launcher_before_s)
    charged_s = job_cpu_s(agent, job) - charged_before
    print(f"burst: true {true_s:.3f} s, charged {charged_s:.3f} s, per-process scan {per_process_s:.3f} s")
    assert children_s >= 300 * 0.04 * 0.95
    assert charged_s == pytest.approx(true_s, rel=0.05), (charged_s, true_s, per_process_s)
    assert agent.ledger.job(job).processes == 1  # only the launcher is left
    agent.close()
    # The per-process scan sees few of the 300: most of their CPU time would have gone unattributed.
    assert per_process_s < 0.5 * true_s, (per_process_s, true_s)


def _process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def test_a_running_daemon_charges_a_pods_short_processes_from_its_cgroup(tmp_path, v2_cgroups, processes, agents):
    uid = str(uuid.uuid4())
    job = f"pod-{uid}"
    sysfs = tmp_path / "sys"
    (sysfs / "fs").mkdir(parents=True)
    mount = v2_cgroups.mount
    (sysfs / "fs" / "cgroup").symlink_to(mount.parent if mount.name == "unified" else mount)
    ready, go = tmp_path / "ready", tmp_path / "go"
    os.mkfifo(go)
    launcher = v2_cgroups.spawn(
        f"kubepods/burstable/pod{uid}/{uuid.uuid4().hex * 2}",
        [sys.executable, "-c", BURST, str(ready), str(go), "100", "0.04"],
    )
    processes.append(launcher)
    wait_until(ready.exists, timeout_s=30, what="the launcher to start")
    agent = AgentProcess(tmp_path / "state", sysfs=sysfs, interval_s=0.25)
    agents.append(agent)
    wait_until(
        lambda: metric_sum(agent.metrics(), "jouleward_job_processes", job_id=job) == 1,
        timeout_s=30,
        what="the pod's job",
    )
    agent.wait_ticks(2)
    before_s = metric_sum(agent.metrics(), "jouleward_job_cpu_seconds_total", job_id=job)
    launcher_before_s = _process_cpu_s(launcher.pid)
    with open(go, "w") as fifo:
        fifo.write("go")
    done = Path(str(ready) + ".done")
    wait_until(done.exists, timeout_s=120, what="the burst to finish")
    agent.wait_ticks(3)
    children_s, launcher_s = (float(v) for v in done.read_text().split())
    true_s = children_s + (launcher_s - launcher_before_s)
    charged_s = metric_sum(agent.metrics(), "jouleward_job_cpu_seconds_total", job_id=job) - before_s
    assert children_s >= 100 * 0.04 * 0.95
    assert charged_s == pytest.approx(true_s, rel=0.05), (charged_s, true_s)


def test_a_registration_reads_every_stat_again_so_a_reused_pid_is_the_new_process(tmp_path):
    host = Host(tmp_path, "v2")
    host.process(300, "/user.slice/x", cpu_s=1.0)  # a host process: not read after its first scan
    agent = make_agent(host, tmp_path)
    agent.tick()
    agent.tick()
    # Its pid comes back as another process between two ticks, which is then registered.
    host.exit(300)
    host.process(300, "/user.slice/x", cpu_s=0.5, start_ticks=boot_ticks_now() + 1)
    job = agent.register_job("train", [300], {})
    start = agent.registry.get(job.ref.id).root_keys[0].start_ticks
    assert start > 1
    host.set_process_cpu(300, 0.75, start_ticks=start)
    host.advance(1.0, 10.0)
    agent.tick()
    view = agent.ledger.job(job.ref.id)
    assert view.finished_at is None and view.processes == 1
    host.set_process_cpu(300, 1.25, start_ticks=start)
    host.advance(1.0, 10.0)
    agent.tick()
    assert job_cpu_s(agent, job.ref.id) == pytest.approx(1.25)  # born since the last scan: all of its CPU time
    agent.close()
