"""CPU time of cgroup-defined jobs (pods, Slurm jobs, systemd units) from the
kernel's own counter of each job's cgroup: ``cpu.stat`` ``usage_usec`` on the
unified (v2) hierarchy, ``cpuacct.usage`` (nanoseconds) on a v1 ``cpuacct``
hierarchy. The counter covers every thread and every process that ever ran in
the cgroup or below it, including those that started and exited between two
ticks, which a per-process scan never sees.

A job's cgroup is its top one (a pod's pod-level cgroup covers its
containers, a Slurm job's ``job_<id>`` its steps). Where one counted cgroup
lies inside another, the outer one is charged only what its counter grew by
beyond the inner ones', so nothing is counted twice. A cgroup that disappears
between two ticks loses what happened since its last read, and no more.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.model import JobRef
from agent.workloads.procfs import ScannedProcess

UNIFIED = ""  # the hierarchy name of cgroup v2 in /proc/<pid>/cgroup ("0::<path>")
_USAGE_V2 = b"usage_usec "


@dataclass(frozen=True, slots=True)
class CgroupCounter:
    """Where one job cgroup's cumulative CPU counter lives."""

    hierarchy: str  # UNIFIED, or the v1 controllers as /proc/<pid>/cgroup names them ("cpu,cpuacct")
    path: str  # the job's cgroup from the hierarchy's root: "/kubepods/burstable/pod<uid>"


def accounts_cpu(hierarchy: str) -> bool:
    """Whether a hierarchy of /proc/<pid>/cgroup keeps a CPU counter per cgroup."""
    return hierarchy == UNIFIED or "cpuacct" in hierarchy.split(",")


def parse_usage_ns(hierarchy: str, data: bytes) -> int | None:
    """Cumulative CPU nanoseconds from ``cpu.stat`` (v2) or ``cpuacct.usage`` (v1)."""
    try:
        if hierarchy != UNIFIED:
            return int(data.strip())
        for line in data.split(b"\n"):
            if line.startswith(_USAGE_V2):
                return int(line[len(_USAGE_V2) :]) * 1000
    except ValueError:
        return None
    return None


def charged_ns(previous: tuple[int, int] | None, now: tuple[int, int], born: bool) -> int:
    """Pure: what a counter adds this tick, from (inode, nanoseconds) readings.

    A counter seen for the first time is a baseline (0), unless its cgroup is
    new since the previous scan (``born``: all of it is new). A different
    inode, or a counter lower than before, is a cgroup removed and made again
    under the same path: everything the new one counts is new.
    """
    inode, value = now
    if previous is None:
        return value if born else 0
    if previous[0] != inode or value < previous[1]:
        return value
    return value - previous[1]


def nearest_counted_ancestors(counters: Iterable[CgroupCounter]) -> dict[CgroupCounter, CgroupCounter]:
    """Each counter's closest counted ancestor in the same hierarchy, where it has one."""
    counted = {(c.hierarchy, c.path): c for c in counters}
    found: dict[CgroupCounter, CgroupCounter] = {}
    for counter in counted.values():
        path = counter.path.rstrip("/")
        while path:
            path = path.rpartition("/")[0]
            above = counted.get((counter.hierarchy, path or "/"))
            if above is not None and above is not counter:
                found[counter] = above
                break
    return found


@dataclass(frozen=True, slots=True)
class JobProcesses:
    """One scan's processes grouped by job: what a tick's per-job sums need."""

    refs: dict[str, JobRef]
    counts: dict[str, int]
    pids: dict[str, list[int]]
    # Processes of jobs defined per process, with the counted cgroup each lies in (if any).
    per_process: list[tuple[ScannedProcess, str, CgroupCounter | None]]
    counted: dict[CgroupCounter, list[tuple[ScannedProcess, str]]]  # by the cgroup that counts them
    members: dict[CgroupCounter, JobRef]  # each counted cgroup and its job
    born: frozenset[CgroupCounter]  # counted cgroups whose processes all started since the previous scan
    host: list[ScannedProcess]  # in no job: their share is the remainder, their own CPU time is never needed


def group_jobs(
    processes: list[ScannedProcess],
    jobs: list[JobRef | None],
    counters: list[CgroupCounter | None],
    enclosing: Callable[[ScannedProcess], CgroupCounter | None],
    since_boot_ticks: float | None,
) -> JobProcesses:
    """Group a scan by job; ``counters[i]`` is the cgroup whose counter
    defines process i's CPU time, None where its own CPU time counts."""
    refs: dict[str, JobRef] = {}
    counts: dict[str, int] = {}
    pids: dict[str, list[int]] = {}
    per_process: list[tuple[ScannedProcess, str, CgroupCounter | None]] = []
    counted: dict[CgroupCounter, list[tuple[ScannedProcess, str]]] = {}
    members: dict[CgroupCounter, JobRef] = {}
    older: set[CgroupCounter] = set()
    host: list[ScannedProcess] = []
    for process, ref, counter in zip(processes, jobs, counters):
        if ref is None:
            host.append(process)
            continue
        job_id = ref.id
        counts[job_id] = counts.get(job_id, 0) + 1
        refs[job_id] = ref
        pids.setdefault(job_id, []).append(process.key.pid)
        if counter is None:
            per_process.append((process, job_id, enclosing(process)))
            continue
        group = counted.get(counter)
        if group is None:
            group = counted[counter] = []
            members[counter] = ref
        group.append((process, job_id))
        if since_boot_ticks is None or process.key.start_ticks < since_boot_ticks:
            older.add(counter)
    return JobProcesses(refs, counts, pids, per_process, counted, members, frozenset(members.keys() - older), host)


@dataclass(frozen=True, slots=True)
class CgroupCpu:
    """One tick's reading of the job cgroups."""

    job_cpu_s: dict[str, float]  # CPU seconds per job, from its cgroups' counters
    readable: frozenset[CgroupCounter]  # counters read this tick: their members need no per-process reads
    ended: dict[str, JobRef] = field(default_factory=dict)  # jobs charged by a last read, no process left


class CgroupCpuReader:
    """Reads the counters of the job cgroups under ``<sysfs>/fs/cgroup`` each
    tick and turns them into CPU seconds per job."""

    def __init__(self, sysfs: Path) -> None:
        self._root = sysfs / "fs" / "cgroup"
        self._dirs: dict[str, str] = {}  # hierarchy -> its directory, once found
        self._last: dict[CgroupCounter, tuple[int, int]] = {}
        self._jobs: dict[CgroupCounter, JobRef] = {}  # last tick's owner of each counter

    def _hierarchy_dir(self, hierarchy: str) -> str | None:
        known = self._dirs.get(hierarchy)
        if known is not None:
            return known
        root = self._root
        if hierarchy == UNIFIED:
            # A hybrid host mounts v2 at <root>/unified; a pure v2 host at the root itself.
            candidates = [root / "unified", root]
            wanted = "cgroup.controllers"
        else:
            candidates = [root / hierarchy, *(root / name for name in hierarchy.split(",") if name == "cpuacct")]
            wanted = "cpuacct.usage"
        for candidate in candidates:
            if (candidate / wanted).exists():
                self._dirs[hierarchy] = str(candidate)
                return self._dirs[hierarchy]
        return None

    def _read(self, counter: CgroupCounter) -> tuple[int, int] | None:
        base = self._hierarchy_dir(counter.hierarchy)
        if base is None:
            return None
        name = "cpu.stat" if counter.hierarchy == UNIFIED else "cpuacct.usage"
        try:
            fd = os.open(f"{base}{counter.path.rstrip('/')}/{name}", os.O_RDONLY)
        except OSError:
            return None
        try:
            inode = os.fstat(fd).st_ino
            data = os.read(fd, 4096)
        except OSError:
            return None
        finally:
            os.close(fd)
        value = parse_usage_ns(counter.hierarchy, data)
        return None if value is None else (inode, value)

    def read(
        self,
        members: Mapping[CgroupCounter, JobRef],
        born: frozenset[CgroupCounter] = frozenset(),
        inside_s: Mapping[CgroupCounter, float] | None = None,
    ) -> CgroupCpu:
        """CPU seconds per job this tick.

        ``members``: each counted cgroup with live processes and the job it
        charges; ``born``: those whose processes all started since the
        previous scan; ``inside_s``: CPU seconds that processes of other jobs
        (registered, labelled, ruled) used inside a counted cgroup, which that
        cgroup's job is not charged. A cgroup whose processes are all gone
        since the last tick is read once more, for its job."""
        ended = {c: ref for c, ref in self._jobs.items() if c not in members}
        owners = {**ended, **members}
        deltas: dict[CgroupCounter, int] = {}
        last: dict[CgroupCounter, tuple[int, int]] = {}
        for counter in owners:
            now = self._read(counter)
            if now is None:
                continue  # gone, or no accounting here: what it did since the last read is lost
            deltas[counter] = charged_ns(self._last.get(counter), now, counter in born)
            if counter in members:
                last[counter] = now
        own = dict(deltas)
        for inner, outer in nearest_counted_ancestors(deltas).items():
            own[outer] -= deltas[inner]
        for counter, seconds in (inside_s or {}).items():
            if counter in own:
                own[counter] -= int(seconds * 1e9)
        job_cpu_s: dict[str, float] = {}
        for counter, ns in own.items():
            job_id = owners[counter].id
            job_cpu_s[job_id] = job_cpu_s.get(job_id, 0.0) + max(ns, 0) / 1e9
        self._last = last
        self._jobs = {c: ref for c, ref in members.items() if c in last}
        charged_ended = {ref.id: ref for c, ref in ended.items() if c in deltas}
        live_jobs = {ref.id for ref in members.values()}
        return CgroupCpu(
            job_cpu_s,
            frozenset(c for c in members if c in last),
            {job_id: ref for job_id, ref in charged_ended.items() if job_id not in live_jobs},
        )
