"""The per-tick process scan: the agent's hot path.

Each tick lists ``/proc`` and reads ``/proc/stat`` once, and
``/proc/<pid>/stat`` of the processes whose CPU time is needed (see
``ProcessScanner.skip``), nothing else. What does not change during a process's life (its
cgroup, command line, owner, environment labels) is read at most once per
(pid, start time), and only when the job resolver asks for it.

On a real procfs the stat files of the processes read every tick are kept
open and read again with ``pread``: the kernel then formats the file but
walks no path and looks up no pid, which is about half of what an
open/read/close costs. A kept descriptor belongs to its process, not to its
number: once the process has exited, reading it fails (ESRCH) even if the
number has come back for another one.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

from agent.model import ProcessKey

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# Environment variables the resolver cares about; the rest of environ is not kept.
ENV_LABELS = ("JOULEWARD_JOB", "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_JOB_USER")


T = TypeVar("T")


class read_once(Generic[T]):  # noqa: N801 - used like functools.cached_property
    """``functools.cached_property`` for a class with ``__slots__``: the value
    is kept in the slot named after the property with a leading underscore.
    The scan keeps one ProcessFacts per process on the host; a per-instance
    ``__dict__`` would cost more than the facts it holds."""

    def __init__(self, read: Callable[[Any], T]) -> None:
        self.read = read
        self.__doc__ = read.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = getattr(owner, f"_{name}")  # the slot's member descriptor

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> read_once[T]: ...
    @overload
    def __get__(self, instance: object, owner: type | None = None) -> T: ...
    def __get__(self, instance: object | None, owner: type | None = None) -> T | read_once[T]:
        if instance is None:
            return self
        try:
            return self.slot.__get__(instance, owner)
        except AttributeError:  # not read yet
            value = self.read(instance)
            self.slot.__set__(instance, value)
            return value


class ProcessFacts:
    """Static facts about one process, each read from procfs on first use."""

    __slots__ = ("_dir", "key", "_cgroup", "_cgroups", "_cgroup_lines", "_cmdline", "_exe", "_uid", "_env_labels")

    def __init__(self, proc_dir: str, key: ProcessKey | None = None) -> None:
        self._dir = proc_dir
        self.key = key  # the scanner's one key object for this process, reused every tick

    def _read(self, name: str) -> bytes:
        try:
            with open(f"{self._dir}/{name}", "rb") as handle:
                return handle.read()
        except OSError:
            return b""

    @read_once
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

    @read_once
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

    @read_once
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

    @read_once
    def cmdline(self) -> str:
        return self._read("cmdline").rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")

    @read_once
    def exe(self) -> str:
        try:
            return os.readlink(f"{self._dir}/exe")
        except OSError:
            return ""

    @read_once
    def uid(self) -> int:
        try:
            return os.stat(self._dir).st_uid
        except OSError:
            return -1

    @read_once
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
# Kept stat descriptors: at most this many, and at most a quarter of the open-file limit,
# so the HTTP servers and the ledger never run short of descriptors.
MAX_KEPT_STAT_FILES = 16384


def is_procfs_mount(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> bool:
    """Whether ``path`` is where a procfs is mounted (not a fixture tree)."""
    try:
        target = os.path.realpath(path)
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields, sep, tail = line.partition(" - ")
        parts = fields.split()
        if sep and len(parts) > 4 and tail.split(" ", 1)[0] == "proc":
            mount_point = parts[4].replace("\\040", " ")
            if mount_point == target:
                return True
    return False


def kept_stat_file_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_KEPT_STAT_FILES
    return max(0, min(MAX_KEPT_STAT_FILES, soft // 4))


class ProcessScanner:
    """Lists ``/proc`` and reads each process's stat, except for the processes
    named by ``skip``: those whose CPU time is not needed (their job's cgroup
    counts it, or they belong to the host) stay listed with no CPU time and
    no read, until they leave the listing or ``skip`` stops naming them."""

    def __init__(self, procfs: Path) -> None:
        self._procfs = str(procfs)
        self._kept: dict[str, int] = {}  # pid (as listed) -> descriptor of its open stat file
        self._keep_limit = kept_stat_file_limit() if is_procfs_mount(procfs) else 0
        self._facts: dict[ProcessKey, ProcessFacts] = {}
        self._last_cpu_ticks: dict[ProcessKey, int] = {}
        self._last_node: tuple[int, int] | None = None
        self._last_scan_boot_ticks: float | None = None
        self._skip: dict[str, ScannedProcess] = {}
        # The last full scan, for the steady state: the same listing and the same processes to skip.
        self._last_names: list[str] | None = None
        self._last_processes: list[ScannedProcess] = []
        self._read: list[ScannedProcess] = []
        self._read_fds: list[int] = []  # beside _read: each one's kept stat descriptor, -1 where none
        self._reuse = False
        # CPU ticks of just-registered processes at their registration, for the scan after it.
        self._baselines: dict[ProcessKey, int] = {}
        self._baselines_lock = threading.Lock()

    def skip(self, processes: list[ScannedProcess]) -> None:
        """From the next scan on, do not read these processes' stat.

        A pid that leaves the listing has exited; one reused between two scans
        keeps the previous process's identity until it exits (pid numbers come
        back only after the whole pid space has been used)."""
        skip = {str(process.key.pid): process for process in processes}
        if skip.keys() != self._skip.keys():
            self._reuse = False
        self._skip = skip

    def take_baselines(self, keys: tuple[ProcessKey, ...]) -> None:
        """Read these processes' CPU time now (any thread may call it). A
        process the scans skipped (a host process until it was registered)
        has no CPU time to take a difference from; with this, the next scan
        charges it what it used since this moment, not from the scan after."""
        found = {}
        for key in keys:
            try:
                with open(f"{self._procfs}/{key.pid}/stat", "rb") as handle:
                    parsed = parse_stat(handle.read(4096))
            except (OSError, ValueError):
                continue
            if parsed is not None and parsed[3] == key.start_ticks:
                found[key] = parsed[2]
        with self._baselines_lock:
            self._baselines.update(found)

    def _rescan(self, since: float | None) -> bool:
        """The steady state: the listing is the last one's, so only the
        processes not skipped are read, into the last scan's objects. False
        (nothing changed) where one of them is not the process it was."""
        procfs = self._procfs
        os_open, os_read, os_pread, os_close, rdonly = os.open, os.read, os.pread, os.close, os.O_RDONLY
        last_cpu = self._last_cpu_ticks
        updates: list[tuple[ScannedProcess, int]] = []
        for process, kept_fd in zip(self._read, self._read_fds):
            key = process.key
            if kept_fd >= 0:
                try:
                    data = os_pread(kept_fd, 4096, 0)
                except OSError:
                    return False  # exited: the full scan closes it
            else:
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
        read_fds: list[int] = []
        clean = True
        # os.open/os.read: a buffered file object per process costs more than the read itself.
        os_open, os_read, os_pread, os_close, rdonly = os.open, os.read, os.pread, os.close, os.O_RDONLY
        skip = self._skip
        kept = self._kept
        keeping: dict[str, int] = {}
        with self._baselines_lock:
            baselines, self._baselines = self._baselines, {}
        room = self._keep_limit
        for name in names:
            known = skip.get(name)
            if known is not None:
                known.cpu_s = 0.0
                seen[known.key] = SKIPPED
                processes.append(known)
                continue
            if not name.isdigit():
                continue
            data = b""
            kept_fd = -1
            held = kept.pop(name, -1)
            if held >= 0:
                try:
                    data = os_pread(held, 4096, 0)
                    kept_fd = held
                except OSError:
                    os_close(held)  # that process exited; the number may be another one's now
            if kept_fd < 0:
                try:
                    fd = os_open(f"{procfs}/{name}/stat", rdonly)
                except OSError:
                    clean = False
                    continue  # exited between listdir and open
                try:
                    data = os_read(fd, 4096)
                except OSError:
                    os_close(fd)
                    clean = False
                    continue  # exited between open and read
                if len(keeping) < room:
                    kept_fd = fd
                else:
                    os_close(fd)
            # parse_stat, inlined: a call per process is a measurable share of the tick.
            close = data.rfind(b")")
            fields = data[close + 2 :].split(None, 21)
            try:
                if close < 0 or len(fields) < 21:
                    raise ValueError(name)
                start_ticks = int(fields[19])
                cpu_ticks = int(fields[11]) + int(fields[12])
                ppid = int(fields[1])
            except ValueError:
                if kept_fd >= 0:
                    os_close(kept_fd)
                clean = False
                continue
            key = ProcessKey(int(name), start_ticks)
            if kept_fd >= 0:
                keeping[name] = kept_fd
            read_fds.append(kept_fd)
            previous = last_cpu.get(key)
            if previous == SKIPPED:
                # Not read last time: nothing to take a difference from, unless it was just registered.
                baseline = baselines.pop(key, None) if baselines else None
                used = 0 if baseline is None else cpu_ticks - baseline
            elif previous is not None:
                used = cpu_ticks - previous
            elif since is not None and start_ticks >= since:
                used = cpu_ticks  # born during this interval: all its CPU time is new
            else:
                used = 0  # already running when the agent first saw it
            process_facts = facts.get(key)
            if process_facts is None:
                process_facts = facts[key] = ProcessFacts(f"{procfs}/{name}", key)
            elif process_facts.key is not None:
                key = process_facts.key  # one key object per process, not a new one every tick
            seen[key] = cpu_ticks
            scanned = ScannedProcess(key, ppid, max(used, 0) / CLK_TCK, process_facts)
            processes.append(scanned)
            read.append(scanned)
        exited = [key for key in last_cpu if key not in seen]
        for key in exited:
            facts.pop(key, None)
        for fd in kept.values():  # exited, or skipped from now on
            os_close(fd)
        self._kept = keeping
        self._last_cpu_ticks = seen
        self._last_scan_boot_ticks = now_boot_ticks
        self._last_names, self._last_processes, self._read, self._reuse = names, processes, read, clean
        self._read_fds = read_fds
        return Scan(processes, self._node_cpu(), exited, seen, since)

    def close(self) -> None:
        """Close the stat files kept open; the next scan opens them again."""
        for fd in self._kept.values():
            os.close(fd)
        self._kept = {}
        self._read_fds = [-1] * len(self._read)
        self._reuse = False
