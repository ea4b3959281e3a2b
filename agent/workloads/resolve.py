"""Which job does a process belong to? First match wins:

1. registered through the control API (a process tree, later children included);
2. a Kubernetes pod, from any hierarchy's cgroup path (kubepods with containerd, CRI-O or docker);
3. a Slurm job, from any hierarchy's cgroup path (``/slurm/uid_N/job_M`` or ``slurmstepd.scope/job_M``);
4. a systemd service or scope, from the cgroup path (sessions and init excluded), except
   that a ``JOULEWARD_JOB`` label beats a transient one (a scope, or anything under ``user@*.service``);
5. the ``JOULEWARD_JOB=<name>`` label in the process environment;
6. a configured rule on command line, executable, user or cgroup.

Anything else belongs to the host: its energy is unattributed.
"""

from __future__ import annotations

import fnmatch
import pwd
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.config import JobRule
from agent.model import JobRef, ProcessKey
from agent.workloads.cgroupcpu import CgroupCounter, accounts_cpu
from agent.workloads.kubelet import PodMeta
from agent.workloads.mljob import DEFAULT_JOB_LABELS, job_for_pod, pod_info_labels
from agent.workloads.procfs import ProcessFacts, ScannedProcess
from agent.workloads.registry import Registry
from agent.workloads.slurm import SlurmIdentity, identity_from_environ

_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
_CONTAINER_ID = re.compile(r"(?:cri-containerd-|crio-|docker-|containerd-|libpod-)?([0-9a-f]{64})(?:\.scope)?$")
_SLURM_JOB = re.compile(r"/job_(\d+)(?:/|$)")
_SYSTEMD_UNIT = re.compile(r"([^/]+\.(?:service|scope))$")


@dataclass(frozen=True, slots=True)
class CgroupJob:
    ref: JobRef
    container_id: str = ""
    cgroup: str = ""  # the job's top cgroup in the path it was found in (a pod's, not a container's)
    # A systemd scope (tmux, a terminal, a docker container) or anything under a user
    # manager (user@*.service): incidental to the work, so an explicit JOULEWARD_JOB wins.
    transient: bool = False


def job_from_cgroup(path: str, unit_exclude: tuple[str, ...] = ()) -> CgroupJob | None:
    """Pure: a pod, Slurm job or systemd unit from a cgroup path."""
    return job_from_cgroups((path,), unit_exclude)


def _pod(path: str) -> CgroupJob | None:
    if "kubepods" not in path:
        return None
    match = _POD_UID.search(path)
    if not match:
        return None
    uid = match.group(1).replace("_", "-")
    container = _CONTAINER_ID.search(path.rstrip("/"))
    end = path.find("/", match.end())
    top = path if end < 0 else path[:end]
    return CgroupJob(JobRef(f"pod-{uid}", uid, "pod"), container.group(1) if container else "", cgroup=top)


def _slurm(path: str) -> CgroupJob | None:
    match = _SLURM_JOB.search(path) if "slurm" in path else None
    if not match:
        return None
    return CgroupJob(JobRef(f"slurm-{match.group(1)}", match.group(1), "slurm"), cgroup=path[: match.end(1)])


def job_from_cgroups(paths: Sequence[str], unit_exclude: tuple[str, ...] = ()) -> CgroupJob | None:
    """Pure: a pod in any hierarchy, else a Slurm job in any, else the
    systemd unit of the first path that names one (the unified one first)."""
    paths = [path for path in paths if path and path != "/"]
    for find in (_pod, _slurm):
        for path in paths:
            found = find(path)
            if found is not None:
                return found
    for path in paths:
        components = path.strip("/").split("/")
        for depth in range(len(components) - 1, -1, -1):
            component = components[depth]
            match = _SYSTEMD_UNIT.match(component)
            if match:
                unit = match.group(1)
                if any(fnmatch.fnmatchcase(unit, pattern) for pattern in unit_exclude):
                    return None
                transient = unit.endswith(".scope") or any(fnmatch.fnmatchcase(c, "user@*.service") for c in components)
                top = "/" + "/".join(components[: depth + 1])
                return CgroupJob(JobRef(f"systemd-{unit}", unit, "systemd"), cgroup=top, transient=transient)
    return None


def counter_of(
    lines: Sequence[tuple[str, str]], job_id: str, unit_exclude: tuple[str, ...] = ()
) -> CgroupCounter | None:
    """Pure: the CPU counter of a cgroup job, from a process's (hierarchy, path)
    lines: the first hierarchy that keeps CPU time and names the same job
    (unified first; on a hybrid host a v1 ``cpuacct`` one may be the one that does)."""
    for hierarchy, path in lines:
        if not accounts_cpu(hierarchy):
            continue
        found = job_from_cgroups((path,), unit_exclude)
        if found is not None and found.ref.id == job_id and found.cgroup:
            return CgroupCounter(hierarchy, found.cgroup)
    return None


def _user_matches(wanted: str, uid: int) -> bool:
    if wanted.isdigit():
        return int(wanted) == uid
    try:
        return pwd.getpwnam(wanted).pw_uid == uid
    except KeyError:
        return False


@dataclass(frozen=True)
class CompiledRule:
    rule: JobRule
    cmdline: re.Pattern | None
    exe: re.Pattern | None
    cgroup: re.Pattern | None

    @classmethod
    def of(cls, rule: JobRule) -> CompiledRule:
        return cls(
            rule,
            re.compile(rule.cmdline) if rule.cmdline else None,
            re.compile(rule.exe) if rule.exe else None,
            re.compile(rule.cgroup) if rule.cgroup else None,
        )

    def matches(self, facts: ProcessFacts) -> bool:
        """Every matcher the rule names must match."""
        if self.cmdline and not self.cmdline.search(facts.cmdline):
            return False
        if self.exe and not self.exe.search(facts.exe):
            return False
        if self.cgroup and not self.cgroup.search(facts.cgroup):
            return False
        if self.rule.user and not _user_matches(self.rule.user, facts.uid):
            return False
        return True


class PodSource(Protocol):
    """Pod metadata by UID (``agent.workloads.kubelet.KubeletPoller``)."""

    def pod(self, uid: str) -> PodMeta | None: ...

    def want(self, uid: str) -> None: ...


def merge_info_labels(parts: list[dict[str, str]]) -> dict[str, str]:
    """Info labels of a job with several pods (or none known): distinct values, comma-joined."""
    merged: dict[str, list[str]] = {}
    for labels in parts:
        for key, value in labels.items():
            values = merged.setdefault(key, [])
            if value and value not in values:
                values.append(value)
    return {key: ",".join(values) for key, values in merged.items()}


class JobResolver:
    """Maps scanned processes to jobs, caching the answer per process key.

    Registered membership is checked every tick (cheap dict lookups); the
    cgroup, environment and rule chain runs once per process. A pod's ML job
    is looked up every tick from the pod UID (a dict lookup), so metadata that
    arrives after the process is first seen applies from the next tick.
    ``info_labels`` holds, after each ``resolve``, the labels for
    ``jouleward_job_info`` of the pod and Slurm jobs seen in it.
    """

    def __init__(
        self,
        registry: Registry,
        rules: tuple[JobRule, ...] = (),
        unit_exclude: tuple[str, ...] = (),
        pods: PodSource | None = None,
        pod_job_labels: tuple[str, ...] = DEFAULT_JOB_LABELS,
    ) -> None:
        self.registry = registry
        self._rules = [CompiledRule.of(rule) for rule in rules]
        self._unit_exclude = unit_exclude
        self._pods = pods
        self._pod_job_labels = pod_job_labels
        self._static: dict[ProcessKey, JobRef | CgroupJob | None] = {}
        self._counters: dict[ProcessKey, CgroupCounter] = {}  # processes whose job is their cgroup's
        self._enclosing: dict[ProcessKey, CgroupCounter | None] = {}
        self.counters: list[CgroupCounter | None] = []
        self._last: tuple[list[ScannedProcess], list[JobRef | None]] | None = None
        self._slurm_pending = False  # a Slurm job seen last time still lacks its name
        self._generation_seen = -1
        # uid -> (the PodMeta it was derived from, job, info labels); recomputed when the meta object changes
        self._pod_jobs: dict[str, tuple[PodMeta | None, JobRef, dict[str, str]]] = {}
        # Slurm job id -> name and user; one per job id, fixed once an environment vouches for it.
        self._slurm: dict[str, SlurmIdentity] = {}
        self.info_labels: dict[str, dict[str, str]] = {}

    def _static_job(self, process: ScannedProcess) -> JobRef | CgroupJob | None:
        facts = process.facts
        found = job_from_cgroups(facts.cgroups, self._unit_exclude)
        if found and found.ref.kind in ("pod", "slurm"):
            self._counter(process.key, facts, found)
            return found  # pods and Slurm jobs take their name from metadata resolved per tick
        label = facts.env_labels.get("JOULEWARD_JOB", "").strip()
        if found and not (label and found.transient):
            self._counter(process.key, facts, found)
            return found.ref
        if label:
            return JobRef(f"env-{label}", label, "env")
        for rule in self._rules:
            if rule.matches(facts):
                return JobRef(f"rule-{rule.rule.name}", rule.rule.name, "rule")
        return None

    def _counter(self, key: ProcessKey, facts: ProcessFacts, found: CgroupJob) -> None:
        counter = counter_of(facts.cgroup_lines, found.ref.id, self._unit_exclude)
        if counter is not None:
            self._counters[key] = counter

    def enclosing_counter(self, process: ScannedProcess) -> CgroupCounter | None:
        """The counter of the cgroup job a process lies in, whatever job it
        belongs to (a registered process inside a pod): that job's counter
        includes its CPU time."""
        key = process.key
        if key in self._enclosing:
            return self._enclosing[key]
        found = job_from_cgroups(process.facts.cgroups, self._unit_exclude)
        counter = counter_of(process.facts.cgroup_lines, found.ref.id, self._unit_exclude) if found else None
        self._enclosing[key] = counter
        return counter

    def resolve(self, processes: list[ScannedProcess]) -> list[JobRef | None]:
        """The job of each process, in order; None for host processes.
        ``counters`` holds, after each call, the counter whose cgroup defines
        each process's job (None where the job is defined per process).
        The same process list as last time (the scanner's steady state), with
        the same registrations and pod metadata, gets the same list back."""
        registry = self.registry
        # Read once, before any process is judged: a registration confirmed while
        # this walk runs must make the next call walk again, not be taken as seen.
        generation = registry.generation
        if (
            self._last is not None
            and processes is self._last[0]
            and generation == self._generation_seen
            and not self._slurm_pending
            and self._pods_unchanged()
        ):
            return self._last[1]
        rescan_tree = generation != self._generation_seen
        by_pid: dict[int, ScannedProcess] = {}  # built on the first walk: most ticks need none
        registered: dict[ProcessKey, str | None] = {}

        def registered_job(process: ScannedProcess) -> str | None:
            # Walk up the parent chain iteratively: deep trees must not recurse.
            chain: list[ScannedProcess] = []
            current = process
            job_id = None
            while True:
                if current.key in registered:
                    job_id = registered[current.key]
                    break
                job_id = registry.job_of(current.key)
                if job_id is not None:
                    break
                if not rescan_tree and current is not process and current.key in self._static:
                    break  # known, and roots have not changed since it was last checked
                chain.append(current)
                if not by_pid:
                    by_pid.update((p.key.pid, p) for p in processes)
                parent = by_pid.get(current.ppid)
                # A parent starts before its child; anything else is a reused pid.
                if parent is None or parent.key == current.key or parent.key.start_ticks > current.key.start_ticks:
                    break
                current = parent
            for member in chain:
                registered[member.key] = job_id
                if job_id is not None:
                    registry.adopt(member.key, job_id)
            return job_id

        jobs: list[JobRef | None] = []
        counters: list[CgroupCounter | None] = []
        cgroup_counter = self._counters.get
        deferred: list[tuple[int, CgroupJob, ScannedProcess]] = []
        for process in processes:
            job_id = registry.job_of(process.key)
            if job_id is None and (rescan_tree or process.key not in self._static):
                job_id = registered_job(process)
            if job_id is not None:
                job = registry.jobs.get(job_id)  # a plain dict read: no lock per process
                if job is not None:
                    jobs.append(job.ref)
                    counters.append(None)
                    continue
            static = self._static.get(process.key, ...)
            if static is ...:
                static = self._static[process.key] = self._static_job(process)
            counters.append(cgroup_counter(process.key))
            if isinstance(static, CgroupJob):
                deferred.append((len(jobs), static, process))
                static = None
            jobs.append(static)
        self._generation_seen = generation
        self._resolve_deferred(jobs, deferred)
        self.counters = counters
        self._last = (processes, jobs)
        return jobs

    def _pods_unchanged(self) -> bool:
        pods = self._pods
        if pods is None:
            return True
        return all(pods.pod(uid) is meta for uid, (meta, _ref, _labels) in self._pod_jobs.items())

    def _pod_job(self, uid: str) -> tuple[PodMeta | None, JobRef, dict[str, str]]:
        meta = self._pods.pod(uid) if self._pods is not None else None
        cached = self._pod_jobs.get(uid)
        if cached is not None and cached[0] is meta:
            return cached
        if meta is None:
            # No metadata yet (or no kubelet configured): the pod is its own job.
            if self._pods is not None:
                self._pods.want(uid)
            entry = (None, JobRef(f"pod-{uid}", uid, "pod"), {"pod_uid": uid})
        else:
            found = job_for_pod(meta, self._pod_job_labels)
            entry = (meta, found.job, pod_info_labels(meta, found.source))
        self._pod_jobs[uid] = entry
        return entry

    def _slurm_identity(self, job_id: str, members: list[ScannedProcess]) -> SlurmIdentity | None:
        known = self._slurm.get(job_id)
        if known is not None:
            return known
        for process in members:  # slurmstepd itself lacks the job's environment; its tasks have it
            identity = identity_from_environ(job_id, process.facts.env_labels)
            if identity.name != job_id or identity.user:
                self._slurm[job_id] = identity
                return identity
        return None

    def _resolve_deferred(
        self, jobs: list[JobRef | None], deferred: list[tuple[int, CgroupJob, ScannedProcess]]
    ) -> None:
        info: dict[str, list[dict[str, str]]] = {}
        seen_uids: set[str] = set()
        slurm: dict[str, list[tuple[int, ScannedProcess]]] = {}
        for slot, found, process in deferred:
            if found.ref.kind == "pod":
                uid = found.ref.name
                _meta, ref, labels = self._pod_job(uid)
                jobs[slot] = ref
                if uid not in seen_uids:
                    seen_uids.add(uid)
                    info.setdefault(ref.id, []).append(labels)
            else:
                slurm.setdefault(found.ref.name, []).append((slot, process))
        for job_id, members in slurm.items():
            identity = self._slurm_identity(job_id, [process for _slot, process in members])
            ref = JobRef(f"slurm-{job_id}", identity.name if identity else job_id, "slurm")
            for slot, _process in members:
                jobs[slot] = ref
            info[ref.id] = [{"user": identity.user}] if identity and identity.user else []
        self._pod_jobs = {uid: entry for uid, entry in self._pod_jobs.items() if uid in seen_uids}
        self._slurm = {job_id: identity for job_id, identity in self._slurm.items() if job_id in slurm}
        self._slurm_pending = any(job_id not in self._slurm for job_id in slurm)
        self.info_labels = {job_id: merge_info_labels(parts) for job_id, parts in info.items()}

    def forget(self, exited: list[ProcessKey]) -> None:
        for key in exited:
            self._static.pop(key, None)
            self._counters.pop(key, None)
            self._enclosing.pop(key, None)
