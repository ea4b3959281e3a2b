"""The per-tick process scan: the agent's hot path.

Each tick lists ``/proc`` and reads ``/proc/stat`` once, and
``/proc/<pid>/stat`` of the processes whose CPU time is needed (see
``ProcessScanner.skip``), nothing else. What does not change during a process's life (its
cgroup, command line, owner, environment labels) is read at most once per
(pid, start time), and only when the job resolver asks for it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from agent.model import ProcessKey

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# Environment variables the resolver cares about; the rest of environ is not kept.
ENV_LABELS = ("JOULEWARD_JOB", "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_JOB_USER")


class ProcessFacts:
    """Static facts about one process, each read from procfs on first use."""

    __slots__ = ("_dir", "__dict__")

    def __init__(self, proc_dir: str) -> None:
        self._dir = proc_dir

    def _read(self, name: str) -> bytes:
        try:
            with open(f"{self._dir}/{name}", "rb") as handle:
                return handle.read()
        except OSError:
            return b""

    @cached_property
    def cgroup(self) -> str:
        """The process's cgroup path: the unified (v2) one, else the deepest v1 one."""
        best = ""
        for line in self._read("cgroup").decode("utf-8", "replace").splitlines():
            path = line.split(":", 2)[-1]
            if line.startswith("0::") and path != "/":
                return path
            if len(path) > len(best):
                best = path
        return best

    @cached_property
    def cgroups(self) -> tuple[str, ...]:
        """Every hierarchy's path, the unified (v2) one first. A hybrid host
        lists v1 controllers (where Slurm's cgroup plugin puts the job) beside
        a ``0::`` line that may only name the daemon's systemd unit."""
        unified: list[str] = []
        legacy: list[str] = []
        for line in self._read("cgroup").decode("utf-8", "replace").splitlines():
            path = line.split(":", 2)[-1]
            if path and path != "/":
                (unified if line.startswith("0::") else legacy).append(path)
        return tuple(dict.fromkeys(unified + legacy))

    @cached_property
    def cgroup_lines(self) -> tuple[tuple[str, str], ...]:
        """(hierarchy, path) of every hierarchy but the root, the unified one
        (hierarchy "") first; a v1 hierarchy is named by its controllers."""
        unified: list[tuple[str, str]] = []
        legacy: list[tuple[str, str]] = []
        for line in self._read("cgroup").decode("utf-8", "replace").splitlines():
            number, _, rest = line.partition(":")
            hierarchy, _, path = rest.partition(":")
            if path and path != "/":
                (unified if number == "0" and not hierarchy else legacy).append((hierarchy, path))
        return tuple(unified + legacy)

    @cached_property
    def cmdline(self) -> str:
        return self._read("cmdline").rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")

    @cached_property
    def exe(self) -> str:
        try:
            return os.readlink(f"{self._dir}/exe")
        except OSError:
            return ""

    @cached_property
    def uid(self) -> int:
        try:
            return os.stat(self._dir).st_uid
        except OSError:
            return -1

    @cached_property
    def env_labels(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for entry in self._read("environ").split(b"\0"):
            name, sep, value = entry.partition(b"=")
            if sep and name.decode("ascii", "replace") in ENV_LABELS:
                found[name.decode()] = value.decode("utf-8", "replace")
        return found


@dataclass(frozen=True, slots=True)
class NodeCpu:
    busy_s: float  # busy CPU-seconds across all CPUs since the previous scan
    utilization_ratio: float  # busy share of all CPU time, 0..1


@dataclass(slots=True)
class ScannedProcess:
    key: ProcessKey
    ppid: int
    cpu_s: float  # CPU time used since the previous scan
    facts: ProcessFacts


@dataclass(frozen=True, slots=True)
class Scan:
    processes: list[ScannedProcess]
    node: NodeCpu
    exited: list[ProcessKey]
    live: Mapping[ProcessKey, int]  # every process seen, with its cumulative CPU ticks (SKIPPED if not read)
    since_boot_ticks: float | None = None  # when the previous scan ran (CLOCK_BOOTTIME, clock ticks)


def parse_stat(data: bytes) -> tuple[str, int, int, int, int] | None:
    """(comm, ppid, cpu_ticks, start_ticks, rss_pages) from /proc/<pid>/stat."""
    close = data.rfind(b")")
    if close < 0:
        return None
    fields = data[close + 2 :].split(None, 22)  # fields past rss are never needed
    if len(fields) < 22:
        return None
    comm = data[data.find(b"(") + 1 : close].decode("utf-8", "replace")
    return comm, int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[19]), int(fields[21])


def parse_proc_stat_cpu(data: bytes) -> tuple[int, int]:
    """(busy, total) clock ticks from the aggregate ``cpu`` line of /proc/stat."""
    line = data.split(b"\n", 1)[0].split()
    values = [int(v) for v in line[1:9]] + [0] * max(0, 8 - len(line[1:9]))
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


SKIPPED = -1  # cumulative CPU ticks of a process whose stat this scan did not read


class ProcessScanner:
    """Lists ``/proc`` and reads each process's stat, except for the processes
    named by ``skip``: those whose CPU time is not needed (their job's cgroup
    counts it, or they belong to the host) stay listed with no CPU time and
    no read, until they leave the listing or ``skip`` stops naming them."""

    def __init__(self, procfs: Path) -> None:
        self._procfs = str(procfs)
        self._facts: dict[ProcessKey, ProcessFacts] = {}
        self._last_cpu_ticks: dict[ProcessKey, int] = {}
        self._last_node: tuple[int, int] | None = None
        self._last_scan_boot_ticks: float | None = None
        self._skip: dict[str, ScannedProcess] = {}
        # The last full scan, for the steady state: the same listing and the same processes to skip.
        self._last_names: list[str] | None = None
        self._last_processes: list[ScannedProcess] = []
        self._read: list[ScannedProcess] = []
        self._reuse = False

    def skip(self, processes: list[ScannedProcess]) -> None:
        """From the next scan on, do not read these processes' stat.

        A pid that leaves the listing has exited; one reused between two scans
        keeps the previous process's identity until it exits (pid numbers come
        back only after the whole pid space has been used)."""
        skip = {str(process.key.pid): process for process in processes}
        if skip.keys() != self._skip.keys():
            self._reuse = False
        self._skip = skip

    def _rescan(self, since: float | None) -> bool:
        """The steady state: the listing is the last one's, so only the
        processes not skipped are read, into the last scan's objects. False
        (nothing changed) where one of them is not the process it was."""
        procfs = self._procfs
        os_open, os_read, os_close, rdonly = os.open, os.read, os.close, os.O_RDONLY
        last_cpu = self._last_cpu_ticks
        updates: list[tuple[ScannedProcess, int]] = []
        for process in self._read:
            key = process.key
            try:
                fd = os_open(f"{procfs}/{key.pid}/stat", rdonly)
            except OSError:
                return False
            try:
                data = os_read(fd, 4096)
            except OSError:
                return False
            finally:
                os_close(fd)
            close = data.rfind(b")")
            fields = data[close + 2 :].split(None, 21)
            if close < 0 or len(fields) < 21 or int(fields[19]) != key.start_ticks:
                return False
            updates.append((process, int(fields[11]) + int(fields[12])))
        for process, cpu_ticks in updates:
            key = process.key
            previous = last_cpu[key]
            process.cpu_s = max(cpu_ticks - previous, 0) / CLK_TCK if previous != SKIPPED else 0.0
            last_cpu[key] = cpu_ticks
        return True

    def _node_cpu(self) -> NodeCpu:
        try:
            with open(f"{self._procfs}/stat", "rb") as handle:
                busy, total = parse_proc_stat_cpu(handle.read(4096))
        except (OSError, ValueError, IndexError):
            return NodeCpu(0.0, 0.0)
        previous, self._last_node = self._last_node, (busy, total)
        if previous is None:
            return NodeCpu(0.0, 0.0)
        d_busy, d_total = max(busy - previous[0], 0), max(total - previous[1], 0)
        return NodeCpu(d_busy / CLK_TCK, d_busy / d_total if d_total else 0.0)

    def scan(self) -> Scan:
        procfs = self._procfs
        now_boot_ticks = time.clock_gettime(time.CLOCK_BOOTTIME) * CLK_TCK
        since = self._last_scan_boot_ticks
        last_cpu = self._last_cpu_ticks
        facts = self._facts
        seen: dict[ProcessKey, int] = {}
        processes: list[ScannedProcess] = []
        try:
            names = os.listdir(procfs)
        except OSError:
            names = []
        if self._reuse and names == self._last_names and self._rescan(since):
            self._last_scan_boot_ticks = now_boot_ticks
            return Scan(self._last_processes, self._node_cpu(), [], self._last_cpu_ticks, since)
        read: list[ScannedProcess] = []
        clean = True
        # os.open/os.read: a buffered file object per process costs more than the read itself.
        os_open, os_read, os_close, rdonly = os.open, os.read, os.close, os.O_RDONLY
        skip = self._skip
        for name in names:
            known = skip.get(name)
            if known is not None:
                known.cpu_s = 0.0
                seen[known.key] = SKIPPED
                processes.append(known)
                continue
            if not name.isdigit():
                continue
            try:
                fd = os_open(f"{procfs}/{name}/stat", rdonly)
            except OSError:
                clean = False
                continue  # exited between listdir and open
            try:
                data = os_read(fd, 4096)
            except OSError:
                clean = False
                continue  # exited between open and read
            finally:
                os_close(fd)
            # parse_stat, inlined: a call per process is a measurable share of the tick.
            close = data.rfind(b")")
            fields = data[close + 2 :].split(None, 21)
            if close < 0 or len(fields) < 21:
                clean = False
                continue
            start_ticks = int(fields[19])
            cpu_ticks = int(fields[11]) + int(fields[12])
            key = ProcessKey(int(name), start_ticks)
            previous = last_cpu.get(key)
            if previous == SKIPPED:
                used = 0  # not read last time: no baseline to take a difference from
            elif previous is not None:
                used = cpu_ticks - previous
            elif since is not None and start_ticks >= since:
                used = cpu_ticks  # born during this interval: all its CPU time is new
            else:
                used = 0  # already running when the agent first saw it
            seen[key] = cpu_ticks
            process_facts = facts.get(key)
            if process_facts is None:
                process_facts = facts[key] = ProcessFacts(f"{procfs}/{name}")
            scanned = ScannedProcess(key, int(fields[1]), max(used, 0) / CLK_TCK, process_facts)
            processes.append(scanned)
            read.append(scanned)
        exited = [key for key in last_cpu if key not in seen]
        for key in exited:
            facts.pop(key, None)
        self._last_cpu_ticks = seen
        self._last_scan_boot_ticks = now_boot_ticks
        self._last_names, self._last_processes, self._read, self._reuse = names, processes, read, clean
        return Scan(processes, self._node_cpu(), exited, seen, since)
