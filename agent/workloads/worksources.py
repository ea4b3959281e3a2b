"""Serving engines' own ``/metrics`` as a job's work units.

A background thread finds, for each running job, the endpoints where its
serving engine counts tokens and requests, scrapes them every ``poll_s``
(bounded in time and size), and keeps the counters' increase pending; each
tick the daemon drains what is pending into the ledger. Nothing here runs on
the tick path, and an endpoint that hangs, vanishes or answers garbage only
marks its source down and stale.

Where an endpoint is found, in order (the same URL is read once per job):

1. a configured ``[[work_sources]]`` rule, by job name or command line;
2. the pod annotation ``jouleward.io/work-metrics: "<port>/<path>"`` (the
   pod's IP; ``jouleward.io/work-engine`` names the engine if detection is
   not wanted);
3. a known engine's command line among the job's processes: the TCP ports
   those processes listen on (``/proc/<pid>/net/tcp*`` rows whose socket
   inode is one of the process's descriptors), probed for ``/metrics``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import DEFAULT_JOB_LABELS, WorkSourceRule
from agent.workloads.engines import Engine, EngineReading, SeriesKey, WorkSourceError, increase, parse_exposition
from agent.workloads.kubelet import PodMeta
from agent.workloads.mljob import job_for_pod

log = logging.getLogger(__name__)

WORK_METRICS_ANNOTATION = "jouleward.io/work-metrics"
WORK_ENGINE_ANNOTATION = "jouleward.io/work-engine"
MAX_TARGETS = 256  # endpoints watched at once, all jobs together
MAX_PIDS_PER_JOB = 64  # processes of one job whose sockets are looked at
MAX_PORTS_PER_JOB = 8
NOT_AN_ENGINE_S = 600.0  # a probed port that served no engine's metrics is not probed again for this long
CHUNK_BYTES = 64 * 1024

# Command lines of the engines, for discovery by listening socket.
ENGINE_COMMANDS = re.compile(
    r"vllm(?:\s+serve|\.entrypoints)|sglang\.launch_server|text-generation-(?:router|launcher)"
    r"|tritonserver|llama-server|llama_cpp\.server"
)


@dataclass(frozen=True, slots=True)
class JobMembers:
    """What the tick knows of a running job: its name and its processes' pids."""

    name: str
    pids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class WorkTarget:
    job_id: str
    url: str
    engine: Engine | None  # None: detected from the exposition
    origin: str  # "config", "annotation" or "socket"


@dataclass(frozen=True, slots=True)
class WorkSourceHealth:
    """One endpoint as the exporter shows it."""

    job_id: str
    url: str
    origin: str
    engine: str  # "" until detected
    up: bool  # the last scrape succeeded
    stale: bool  # the last scrape failed, or none succeeded for 2 * poll_s + timeout_s
    errors_total: int
    last_success_unix_s: float
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class WorkSourceSettings:
    rules: tuple[WorkSourceRule, ...] = ()
    discover_sockets: bool = True
    poll_s: float = 10.0
    timeout_s: float = 2.0
    max_body_bytes: int = 4 * 1024 * 1024
    pod_job_labels: tuple[str, ...] = DEFAULT_JOB_LABELS


@dataclass
class _Source:
    target: WorkTarget
    reading: dict[SeriesKey, float] | None = None
    engine: Engine | None = None
    up: bool = False
    errors: int = 0
    last_error: str = ""
    last_success_mono: float | None = None
    last_success_wall: float = 0.0
    served: dict[tuple[str, str], float] = field(default_factory=dict)  # (unit, model) -> since the agent started


def fetch_exposition(url: str, timeout_s: float, max_bytes: int) -> str:
    """One GET, bounded: the whole answer within ``timeout_s`` (a server that
    drips bytes is cut off too) and at most ``max_bytes``. Raises WorkSourceError."""
    deadline = time.monotonic() + timeout_s
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"Accept": "text/plain"})
    chunks: list[bytes] = []
    size = 0
    try:
        with opener.open(request, timeout=timeout_s) as response:
            while True:
                if time.monotonic() > deadline:
                    raise WorkSourceError(f"no complete answer within {timeout_s:g} s")
                chunk = response.read1(CHUNK_BYTES)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise WorkSourceError(f"answer larger than {max_bytes} bytes")
                chunks.append(chunk)
    except urllib.error.HTTPError as exc:
        raise WorkSourceError(f"HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WorkSourceError(f"unreachable: {reason}") from None
    return b"".join(chunks).decode("utf-8", "replace")


# -- discovery by listening socket -------------------------------------------------


def _hex_address(hex_addr: str) -> str | None:
    """A /proc/net/tcp* local address as a host to connect to."""
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        ip = ".".join(str(b) for b in raw[::-1])
        return "127.0.0.1" if ip == "0.0.0.0" else ip
    if len(raw) == 16:
        words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]  # each 32-bit word in host order
        flat = b"".join(words)
        if flat == bytes(16):
            return "127.0.0.1"  # "::" accepts IPv4 too, by default
        if flat == bytes(15) + b"\x01":
            return "[::1]"
        if flat[:12] == bytes(10) + b"\xff\xff":
            return ".".join(str(b) for b in flat[12:])
        groups = [flat[i : i + 2].hex() for i in range(0, 16, 2)]
        return "[" + ":".join(groups) + "]"
    return None


def listening_endpoints(procfs: Path, pid: int) -> list[tuple[str, int]]:
    """(host, port) of the TCP sockets process ``pid`` listens on."""
    base = procfs / str(pid)
    inodes = set()
    try:
        for fd in os.listdir(base / "fd"):
            try:
                link = os.readlink(base / "fd" / fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return []
    if not inodes:
        return []
    found = []
    for table in ("net/tcp", "net/tcp6"):
        try:
            lines = (base / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10 or parts[3] != "0A" or parts[9] not in inodes:  # 0A: TCP_LISTEN
                continue
            address, _, port_hex = parts[1].partition(":")
            try:
                host = _hex_address(address)
                port = int(port_hex, 16)
            except ValueError:
                continue
            if host is not None:
                found.append((host, port))
    return found


def read_cmdline(procfs: Path, pid: int) -> str:
    try:
        return (
            (procfs / str(pid) / "cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
        )
    except OSError:
        return ""


def pod_targets(pods: Iterable[PodMeta], label_keys: tuple[str, ...]) -> list[WorkTarget]:
    """Endpoints named by pod annotations, keyed by the pod's ML job."""
    targets = []
    for pod in pods:
        where = pod.annotations.get(WORK_METRICS_ANNOTATION, "").strip()
        match = re.fullmatch(r"(\d{1,5})(/[!-~]*)?", where)
        if not match or not 0 < int(match.group(1)) < 65536:
            continue
        try:
            ip = ipaddress.ip_address(pod.pod_ip)
        except ValueError:
            continue  # no IP yet (pending), or not one
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        engine_name = pod.annotations.get(WORK_ENGINE_ANNOTATION, "").strip()
        engine = Engine(engine_name) if engine_name in Engine.__members__.values() else None
        job = job_for_pod(pod, label_keys).job
        targets.append(
            WorkTarget(job.id, f"http://{host}:{match.group(1)}{match.group(2) or '/metrics'}", engine, "annotation")
        )
    return targets


class WorkSourcePoller:
    """Scrapes engines' endpoints on a daemon thread; the tick drains the increases."""

    def __init__(
        self,
        settings: WorkSourceSettings,
        procfs: Path = Path("/proc"),
        pods: Callable[[], Mapping[str, PodMeta]] | None = None,
        fetch: Callable[[str, float, int], str] = fetch_exposition,
    ) -> None:
        self.settings = settings
        self._procfs = procfs
        self._pods = pods
        self._fetch = fetch
        self._lock = threading.Lock()
        self._jobs: dict[str, JobMembers] = {}
        self._sources: dict[tuple[str, str], _Source] = {}
        self._pending: dict[str, dict[str, float]] = {}
        self._not_engine: dict[str, float] = {}  # url -> monotonic time it was found not to be one
        # pid -> command line, kept while the pid stays in a job (the tick hands new members when one leaves)
        self._cmdlines: dict[int, str] = {}
        self._members_version = 0
        self._rules = [
            (rule, re.compile(rule.job) if rule.job else None, re.compile(rule.cmdline) if rule.cmdline else None)
            for rule in settings.rules
        ]
        self._own_netns = self._netns("self")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="jouleward-worksource")

    # -- the tick's side: two dictionary swaps ------------------------------------
    def update_jobs(self, jobs: dict[str, JobMembers]) -> None:
        with self._lock:
            gone = {pid for job in self._jobs.values() for pid in job.pids} - {
                pid for job in jobs.values() for pid in job.pids
            }
            self._jobs = jobs
            self._members_version += 1
            for pid in gone:
                self._cmdlines.pop(pid, None)

    def drain(self) -> dict[str, dict[str, float]]:
        """Work counted since the last drain: job id -> unit -> count."""
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def health(self) -> tuple[WorkSourceHealth, ...]:
        now = time.monotonic()
        overdue_s = 2 * self.settings.poll_s + self.settings.timeout_s
        with self._lock:
            return tuple(
                WorkSourceHealth(
                    job_id=s.target.job_id,
                    url=s.target.url,
                    origin=s.target.origin,
                    engine=str(s.engine or s.target.engine or ""),
                    up=s.up,
                    stale=not s.up or s.last_success_mono is None or now - s.last_success_mono > overdue_s,
                    errors_total=s.errors,
                    last_success_unix_s=s.last_success_wall,
                    last_error=s.last_error,
                )
                for _, s in sorted(self._sources.items())
            )

    def served(self) -> dict[str, dict[tuple[str, str], float]]:
        """Work counted since the agent started, job id -> (unit, model) -> count."""
        out: dict[str, dict[tuple[str, str], float]] = {}
        with self._lock:
            for source in self._sources.values():
                mine = out.setdefault(source.target.job_id, {})
                for key, count in source.served.items():
                    mine[key] = mine.get(key, 0.0) + count
        return out

    # -- the thread's side ---------------------------------------------------------
    def _netns(self, pid: int | str) -> int | None:
        try:
            return os.stat(self._procfs / str(pid) / "ns" / "net").st_ino
        except OSError:
            return None

    def targets(self) -> list[WorkTarget]:
        """Every endpoint to read now, for the running jobs."""
        with self._lock:
            jobs = dict(self._jobs)
            cmdlines = dict(self._cmdlines)
            version = self._members_version
        found: dict[tuple[str, str], WorkTarget] = {}

        def add(target: WorkTarget) -> None:
            if target.job_id in jobs and len(found) < MAX_TARGETS:
                found.setdefault((target.job_id, target.url), target)

        def cmdline(pid: int) -> str:
            if pid not in cmdlines:
                cmdlines[pid] = read_cmdline(self._procfs, pid)
            return cmdlines[pid]

        for job_id, members in jobs.items():
            pids = members.pids[:MAX_PIDS_PER_JOB]
            for rule, job_re, cmd_re in self._rules:
                if job_re is not None and not job_re.search(members.name):
                    continue
                if cmd_re is not None and not any(cmd_re.search(cmdline(pid)) for pid in pids):
                    continue
                add(WorkTarget(job_id, rule.url, Engine(rule.engine) if rule.engine else None, "config"))
        if self._pods is not None:
            for target in pod_targets(self._pods().values(), self.settings.pod_job_labels):
                add(target)
        if self.settings.discover_sockets:
            now = time.monotonic()
            self._not_engine = {u: t for u, t in self._not_engine.items() if now - t < NOT_AN_ENGINE_S}
            for job_id, members in jobs.items():
                ports: set[tuple[str, int]] = set()
                for pid in members.pids[:MAX_PIDS_PER_JOB]:
                    if not ENGINE_COMMANDS.search(cmdline(pid)):
                        continue
                    if self._own_netns is not None and self._netns(pid) != self._own_netns:
                        continue  # another network namespace: its loopback is not ours
                    ports.update(listening_endpoints(self._procfs, pid))
                for host, port in sorted(ports)[:MAX_PORTS_PER_JOB]:
                    url = f"http://{host}:{port}/metrics"
                    if url not in self._not_engine:
                        add(WorkTarget(job_id, url, None, "socket"))
        with self._lock:  # kept while the members are the same: a pid that left may come back as another process
            if version == self._members_version:
                self._cmdlines = cmdlines
        return list(found.values())

    def _scrape(self, target: WorkTarget) -> EngineReading | WorkSourceError:
        try:
            text = self._fetch(target.url, self.settings.timeout_s, self.settings.max_body_bytes)
            return parse_exposition(text, target.engine)
        except WorkSourceError as exc:
            return exc

    def poll_once(self) -> None:
        targets = self.targets()
        results = list(self._pool.map(self._scrape, targets))
        now_mono, now_wall = time.monotonic(), time.time()
        with self._lock:
            wanted = {(t.job_id, t.url) for t in targets}
            # An endpoint not found this time (its engine restarting) keeps its last
            # reading while its job runs, so the restarted engine's counters count from zero.
            self._sources = {k: s for k, s in self._sources.items() if k in wanted or k[0] in self._jobs}
            for target, result in zip(targets, results):
                key = (target.job_id, target.url)
                source = self._sources.get(key)
                if isinstance(result, WorkSourceError):
                    if source is None and target.origin == "socket":
                        self._not_engine[target.url] = now_mono  # a port that is not an engine's: quietly skip
                        continue
                    if source is None:
                        source = self._sources[key] = _Source(target)
                    source.up = False
                    source.errors += 1
                    if str(result) != source.last_error:
                        log.warning("work source %s for job %s: %s", target.url, target.job_id, result)
                    source.last_error = str(result)
                    # Keep the last reading: after an outage the engine's counter tells what was done meanwhile.
                    continue
                if source is None:
                    source = self._sources[key] = _Source(target)
                if source.engine is not None and result.engine != source.engine:
                    source.reading = None  # another engine answers there now: start over
                source.engine = result.engine
                done = increase(source.reading, result.series)
                source.reading = result.series
                source.up = True
                source.last_error = ""
                source.last_success_mono, source.last_success_wall = now_mono, now_wall
                pending = self._pending.setdefault(target.job_id, {})
                for (unit, model), count in done.items():
                    pending[unit] = pending.get(unit, 0.0) + count
                    source.served[(unit, model)] = source.served.get((unit, model), 0.0) + count

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # a bug here must not end the thread
                log.exception("work source poll failed")
            self._stop.wait(self.settings.poll_s)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jouleward-worksources", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self._pool.shutdown(wait=False, cancel_futures=True)
