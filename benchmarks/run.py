"""Overhead of the agent against the floor and against the exporters operators
would otherwise run, measured side by side in one run on the same processes.

    python3 benchmarks/run.py            # full run (about three minutes)
    python3 benchmarks/run.py --quick    # fewer sizes and repetitions
    python3 benchmarks/run.py --daemon   # only the running daemon's CPU per tick and RSS

Every figure is a median over many repetitions, and the verdicts are ratios
between figures taken in the same run, so the table holds on any machine.
CPU time is process CPU time (user + system), not wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from agent.config import Config  # noqa: E402
from agent.pipeline.daemon import Agent  # noqa: E402
from benchmarks.workload import PodCgroups, Sleepers, cgroup_root, churn, write_powercap  # noqa: E402
from exporters.jobs import ExpositionFormat  # noqa: E402
from exporters.prometheus import MetricsRenderer  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROCESS_EXPORTER = shutil.which("prometheus-process-exporter")
NODE_EXPORTER = shutil.which("prometheus-node-exporter")


# -- measurement primitives ------------------------------------------------------
def cpu_per_call_s(call, reps: int) -> float:
    """Median process CPU time of one call."""
    samples = []
    for _ in range(reps):
        started = time.process_time()
        call()
        samples.append(time.process_time() - started)
    return statistics.median(samples)


def read_every_stat() -> None:
    """The floor: list /proc and read every /proc/<pid>/stat once, the
    cheapest way Python can (no file objects, no parsing)."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fd = os.open(f"/proc/{name}/stat", os.O_RDONLY)
            except OSError:
                continue
            try:
                os.read(fd, 4096)
            except OSError:
                pass
            finally:
                os.close(fd)


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as handle:
        fields = handle.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


def scrape_latencies_s(url: str, count: int) -> list[float]:
    samples = []
    with httpx.Client(timeout=10.0) as client:
        client.get(url).raise_for_status()
        for _ in range(count):
            started = time.perf_counter()
            client.get(url).raise_for_status()
            samples.append(time.perf_counter() - started)
    return samples


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# -- the agent, in process ----------------------------------------------------------
def agent_config(workdir: Path, **overrides) -> Config:
    sysfs = workdir / "sys"
    if not sysfs.exists():
        write_powercap(sysfs)
    return dataclasses.replace(
        Config(), procfs=Path("/proc"), sysfs=sysfs, state_dir=workdir / "state", flush_interval_s=3600.0, **overrides
    )


def tick_cost(workdir: Path, processes: int, jobs: int, reps: int) -> tuple[float, float]:
    """(agent CPU per tick, floor CPU per read of every stat), same processes."""
    with Sleepers(processes) as sleepers:
        state = workdir / f"tick-{processes}-{jobs}"
        agent = Agent(agent_config(state, max_exported_jobs=max(jobs, 1)))
        for i in range(jobs):
            agent.register_job(f"bench-{i}", [sleepers.pids[i]], {"team": "bench"})
        for _ in range(3):
            agent.tick()
        # Interleaved, so that both see the same machine at the same moments.
        ticks, floors = [], []
        for _ in range(reps):
            ticks.append(cpu_per_call_s(agent.tick, 1))
            floors.append(cpu_per_call_s(read_every_stat, 1))
        agent.close()
    return statistics.median(ticks), statistics.median(floors)


def scrape_cost(workdir: Path, jobs: int, reps: int) -> float:
    """CPU per /metrics rendering with ``jobs`` exported jobs."""
    with Sleepers(jobs) as sleepers:
        agent = Agent(agent_config(workdir / f"scrape-{jobs}", max_exported_jobs=jobs))
        for i, pid in enumerate(sleepers.pids):
            agent.register_job(f"bench-{i}", [pid], {"team": "bench"})
        agent.tick()
        agent.tick()
        exposition = MetricsRenderer(lambda: agent.snapshot, ExpositionFormat.TEXT)  # as the daemon keeps it
        cost = cpu_per_call_s(exposition.render, reps)
        agent.close()
    return cost


def commit_cost(workdir: Path, jobs: int, reps: int) -> float:
    """CPU of the ledger's per-tick commit when every one of ``jobs`` jobs
    grew in the tick (the worst case: idle jobs write nothing)."""
    from agent.ledger.totals import JobActivity, Ledger
    from agent.model import DeviceEnergy, DomainAttribution, JobRef

    ledger = Ledger(workdir / f"commit-{jobs}")
    refs = [JobRef(f"bench-{i}", f"bench-{i}", "env") for i in range(jobs)]
    for ref in refs:
        ledger.ensure_job(ref, time.time())
    ledger.commit()
    activity = {ref.id: JobActivity(ref, 0.01, 1) for ref in refs}
    costs = []
    for _ in range(reps):
        share = 1.0 / jobs
        parts = [
            DomainAttribution(domain, 10.0, 0.0, 0.0, {ref.id: 10.0 * share for ref in refs})
            for domain in ("cpu", "dram")
        ]
        devices = [
            DeviceEnergy("cpu", "package-0", "rapl", 10.0, 1.0),
            DeviceEnergy("dram", "dram-0", "rapl", 10.0, 1.0),
        ]
        ledger.book_tick(time.time(), devices, parts, activity, 1.0)
        ledger.book_emissions({ref.id: 0.001 for ref in refs}, 0.5)
        costs.append(cpu_per_call_s(lambda: ledger.commit(full=False), 1))
    ledger.close()
    return statistics.median(costs)


def churn_memory(workdir: Path, total: int) -> tuple[float, float]:
    """This process's RSS (MiB) before and after the agent watched ``total``
    short-lived processes come and go."""
    agent = Agent(agent_config(workdir / "churn"))
    for _ in range(3):
        agent.tick()
    step = 2000
    churn(step)  # let caches reach their working size before the baseline
    agent.tick()
    gc.collect()
    before = rss_mib(os.getpid())
    done = step
    while done < total:
        churn(min(step, total - done))
        done += step
        agent.tick()
    agent.tick()
    gc.collect()
    after = rss_mib(os.getpid())
    agent.close()
    return before, after


# -- the agent as a daemon ----------------------------------------------------------
def fake_gpus(workdir: Path, count: int, pids: list[int]) -> dict[str, str]:
    """Environment that makes the daemon see ``count`` GPUs through the fake
    NVML library the tests build (the real nvidia-ml-py bindings load it);
    empty when it cannot be built here."""
    try:
        from tests.fakenvml.build import BuildError, FakeDevice, FakeProcess, FakeState, build

        library = build(workdir / "fakenvml")
    except (ImportError, BuildError, OSError):
        return {}
    now = time.monotonic()
    state = FakeState(
        devices=[
            FakeDevice(i, f"GPU-{i:08x}-bench", epoch_s=now, power_mw=300_000, util_gpu=50, mem_used=2**30)
            for i in range(count)
        ],
        processes=[FakeProcess(i % count, pid, mem=2**28, sm=40) for i, pid in enumerate(pids)],
    )
    state.write(workdir / "nvml-state")
    return {"LD_LIBRARY_PATH": str(library.parent), "FAKENVML_STATE": str(workdir / "nvml-state")}


class Daemon:
    def __init__(self, workdir: Path, env: dict[str, str] | None = None, cgroup_fs: Path | None = None) -> None:
        self.port = free_port()
        self.socket = workdir / "control.sock"
        sysfs = workdir / "sys"
        write_powercap(sysfs)
        if cgroup_fs is not None:  # the real cgroups, beside the RAPL fixture
            (sysfs / "fs").mkdir(exist_ok=True)
            (sysfs / "fs" / "cgroup").symlink_to(cgroup_fs)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "run",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--state-dir",
                str(workdir / "state"),
                "--control-socket",
                str(self.socket),
                "--sysfs",
                str(sysfs),
                "--interval",
                "1",
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        wait_http(self.url + "/healthz")

    def register(self, name: str, pid: int) -> None:
        transport = httpx.HTTPTransport(uds=str(self.socket))
        with httpx.Client(transport=transport, base_url="http://agent", timeout=10.0) as client:
            client.post("/v1/jobs", json={"name": name, "pids": [pid], "labels": {"team": "bench"}}).raise_for_status()

    def ticks(self) -> int:
        return httpx.get(self.url + "/healthz").json()["ticks"]

    def wait_ticks(self, count: int) -> None:
        start = self.ticks()
        deadline = time.monotonic() + 60
        while httpx.get(self.url + "/healthz").json()["ticks"] < start + count:
            if time.monotonic() > deadline:
                raise RuntimeError("the agent stopped ticking")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclasses.dataclass(frozen=True)
class DaemonCost:
    cpu_per_tick_s: float  # the whole daemon (every thread) per tick
    floor_s: float  # one read of every /proc/<pid>/stat, in the same window
    rss_mib: float
    ticks: int


def daemon_cost(daemon: Daemon, window_s: float, scrape_every_s: float) -> DaemonCost:
    """The running daemon's CPU time per tick, from its own /proc/<pid>/stat
    (all its threads: sampler, HTTP servers, pollers) over a window in which a
    scraper fetches /metrics every ``scrape_every_s``; the floor is read in
    this process at the same moments, timed by this thread's CPU clock."""
    daemon.wait_ticks(3)
    stop = threading.Event()

    def scrape() -> None:
        with httpx.Client(timeout=10.0) as client:
            while not stop.wait(scrape_every_s):
                client.get(daemon.url + "/metrics")

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    floors = []
    try:
        ticks_before, cpu_before = daemon.ticks(), proc_cpu_s(daemon.process.pid)
        deadline = time.monotonic() + window_s
        while time.monotonic() < deadline:
            started = time.thread_time()
            read_every_stat()
            floors.append(time.thread_time() - started)
            time.sleep(0.25)
        cpu_after, ticks_after = proc_cpu_s(daemon.process.pid), daemon.ticks()
        rss = rss_mib(daemon.process.pid)
    finally:
        stop.set()
        scraper.join(timeout=15)
    ticks = max(ticks_after - ticks_before, 1)
    return DaemonCost((cpu_after - cpu_before) / ticks, statistics.median(floors), rss, ticks)


def daemon_rows(workdir: Path, quick: bool, row) -> None:
    """The daemon as users run it: 1,000 processes in 50 pods, 1,000 with 500
    registered jobs, and many processes, each beside the floor of its window."""
    window_s, scrape_every_s = (20.0, 15.0) if quick else (60.0, 15.0)

    def show(what: str, cost: DaemonCost, target: float | None) -> None:
        ratio = cost.cpu_per_tick_s / cost.floor_s
        verdict = f"{ratio:.2f}x floor" + (
            f" (target <= {target}x): {'met' if ratio <= target else 'MISSED'}" if target else ""
        )
        row(f"daemon CPU per tick, {what}", fmt_ms(cost.cpu_per_tick_s), f"floor {fmt_ms(cost.floor_s)}", verdict)
        row(f"daemon RSS, {what}", f"{cost.rss_mib:.1f} MiB", "budget 60 MB", f"{cost.rss_mib * 1.048576:.1f} MB")

    try:
        pods = PodCgroups(50, 1000)
    except OSError as exc:
        row("daemon CPU per tick, 1,000 processes in 50 pod cgroups", "-", f"cannot make cgroups: {exc}", "skipped")
    else:
        with pods:
            (workdir / "daemon-pods").mkdir()
            daemon = Daemon(workdir / "daemon-pods", cgroup_fs=cgroup_root(pods.mount))
            try:
                show("1,000 processes in 50 pod cgroups", daemon_cost(daemon, window_s, scrape_every_s), 0.5)
            finally:
                daemon.stop()
    with Sleepers(1000) as sleepers:
        (workdir / "daemon-jobs").mkdir()
        daemon = Daemon(workdir / "daemon-jobs")
        try:
            for i in range(500):
                daemon.register(f"bench-{i}", sleepers.pids[i])
            show("1,000 processes, 500 jobs", daemon_cost(daemon, window_s, scrape_every_s), 1.3)
        finally:
            daemon.stop()
    many = 3000 if quick else 10_000
    with Sleepers(many):
        (workdir / "daemon-many").mkdir()
        daemon = Daemon(workdir / "daemon-many")
        try:
            show(f"{many:,} processes", daemon_cost(daemon, window_s, scrape_every_s), None)
        finally:
            daemon.stop()


class Exporter:
    def __init__(self, argv: list[str], port: int) -> None:
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}/metrics"
        wait_http(self.url)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def process_exporter_cost(workdir: Path, lean: bool, scrapes: int) -> float:
    """CPU time of one process-exporter scrape, from its own /proc/<pid>/stat."""
    config = workdir / "process-exporter.yml"
    config.write_text('process_names:\n  - name: "{{.Comm}}"\n    cmdline:\n    - ".+"\n')
    port = free_port()
    argv = [PROCESS_EXPORTER, "-config.path", str(config), "-web.listen-address", f"127.0.0.1:{port}"]
    if lean:
        argv += ["-threads=false", "-gather-smaps=false"]
    exporter = Exporter(argv, port)
    try:
        with httpx.Client(timeout=30.0) as client:
            for _ in range(3):
                client.get(exporter.url).raise_for_status()
            before = proc_cpu_s(exporter.process.pid)
            for _ in range(scrapes):
                client.get(exporter.url).raise_for_status()
            return (proc_cpu_s(exporter.process.pid) - before) / scrapes
    finally:
        exporter.stop()


# -- the run ----------------------------------------------------------------------
def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument(
        "--churn",
        type=int,
        default=None,
        help="short-lived processes for the leak check (default 100000, 10000 with --quick)",
    )
    parser.add_argument("--daemon", action="store_true", help="only the running daemon's rows")
    args = parser.parse_args(argv)
    quick = args.quick
    reps = 15 if quick else 41
    process_counts = [100, 1000, 3000] if quick else [100, 1000, 3000, 10000]
    job_counts = [10, 500] if quick else [10, 100, 500, 2000]
    churn_total = args.churn if args.churn is not None else (10_000 if quick else 100_000)
    rows: list[tuple[str, str, str, str]] = []

    def row(what: str, ours: str, other: str, verdict: str) -> None:
        rows.append((what, ours, other, verdict))
        print(f"  {what}: {ours} | {other} | {verdict}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="jouleward-bench-") as tmp:
        workdir = Path(tmp)
        background = len([n for n in os.listdir("/proc") if n.isdigit()])

        # 0. The daemon as a running process, beside the floor of the same window.
        daemon_rows(workdir, quick, row)
        if args.daemon:
            print_table(rows, quick, background)
            return 0

        # 1. CPU per tick with 1,000 processes and 500 jobs, against the floor.
        tick, floor = tick_cost(workdir, 1000, 500, reps)
        row(
            "CPU per tick, 1,000 processes, 500 jobs",
            fmt_ms(tick),
            f"floor {fmt_ms(floor)}",
            f"{tick / floor:.2f}x floor (target <= 1.5x)",
        )
        base_tick = tick

        # 1b. What the per-tick commit (no exported counter ahead of the file) costs at worst.
        for jobs in (50, 500):
            commit = commit_cost(workdir, jobs, reps)
            row(
                f"ledger commit per tick, {jobs} jobs all growing",
                fmt_ms(commit),
                f"floor {fmt_ms(floor)}",
                f"+{commit / floor:.2f}x floor on a tick where every job grew",
            )

        # 2. Against process-exporter's CPU per scrape of the same processes.
        if PROCESS_EXPORTER:
            with Sleepers(1000):
                for lean in (False, True):
                    cost = process_exporter_cost(workdir, lean, 20 if quick else 50)
                    label = "lean: -threads=false -gather-smaps=false" if lean else "defaults"
                    row(
                        f"CPU per scrape, process-exporter ({label})",
                        fmt_ms(base_tick),
                        fmt_ms(cost),
                        f"{base_tick / cost:.2f}x process-exporter (target <= 1x)",
                    )
        else:
            row("process-exporter", "-", "not installed", "skipped")

        # 3. Growth of the tick with the number of processes (no jobs).
        per_process = []
        for count in process_counts:
            tick, floor = tick_cost(workdir, count, 0, reps)
            per_process.append(tick / (count + background))
            row(
                f"CPU per tick, {count:,} processes",
                fmt_ms(tick),
                f"floor {fmt_ms(floor)}",
                f"{tick / floor:.2f}x floor, {tick / (count + background) * 1e6:.1f} us/process",
            )
        row(
            "tick growth",
            "",
            "",
            f"us/process from smallest to largest: x{per_process[-1] / per_process[0]:.2f} (linear: about 1)",
        )

        # 4. Scrape rendering cost with the number of jobs.
        per_job = []
        for count in job_counts:
            cost = scrape_cost(workdir, count, reps)
            per_job.append(cost / count)
            row(f"CPU per /metrics rendering, {count:,} jobs", fmt_ms(cost), "", f"{cost / count * 1e6:.1f} us/job")
        row(
            "scrape growth",
            "",
            "",
            f"us/job from 10 to {job_counts[-1]:,} jobs: x{per_job[-1] / per_job[0]:.2f} (fixed cost dominates at 10)",
        )

        # 5. RSS and /metrics latency of the daemon, against node-exporter.
        with Sleepers(1000) as sleepers:
            # The spine's budget (under 60 MB) is for a CPU-only node: measure it alone first.
            (workdir / "daemon-cpu").mkdir()
            daemon = Daemon(workdir / "daemon-cpu", {})
            try:
                for i in range(500):
                    daemon.register(f"bench-{i}", sleepers.pids[i])
                daemon.wait_ticks(5)
                cpu_only_rss = rss_mib(daemon.process.pid)
            finally:
                daemon.stop()
            row(
                "RSS, 1,000 processes, 500 jobs, no GPUs",
                f"{cpu_only_rss:.1f} MiB",
                "budget 60 MB",
                f"{cpu_only_rss * 1.048576:.1f} MB: {'met' if cpu_only_rss * 1.048576 < 60 else 'MISSED'}",
            )
            (workdir / "daemon").mkdir()
            gpu_env = fake_gpus(workdir / "daemon", 8, sleepers.pids[500:516])
            gpus = "8 GPUs (fake NVML)" if gpu_env else "no GPUs (fake NVML unavailable)"
            daemon = Daemon(workdir / "daemon", gpu_env)
            try:
                for i in range(500):
                    daemon.register(f"bench-{i}", sleepers.pids[i])
                daemon.wait_ticks(3)
                agent_rss = rss_mib(daemon.process.pid)
                ours = scrape_latencies_s(daemon.url + "/metrics", 100 if quick else 300)
                agent_rss = max(agent_rss, rss_mib(daemon.process.pid))
            finally:
                daemon.stop()
            if NODE_EXPORTER:
                port = free_port()
                node = Exporter([NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}"], port)
                try:
                    theirs = scrape_latencies_s(node.url, 100 if quick else 300)
                    node_rss = rss_mib(node.process.pid)
                finally:
                    node.stop()
                row(
                    f"RSS, 1,000 processes, 500 jobs, {gpus}",
                    f"{agent_rss:.1f} MiB",
                    f"node-exporter {node_rss:.1f} MiB",
                    f"{agent_rss / node_rss:.2f}x node-exporter (target <= 3x), budget 60 MB: "
                    f"{'met' if agent_rss * 1.048576 < 60 else 'MISSED'}",
                )
                row(
                    "/metrics latency p50, 500 jobs",
                    fmt_ms(percentile(ours, 0.5)),
                    f"node-exporter {fmt_ms(percentile(theirs, 0.5))}",
                    f"{percentile(ours, 0.5) / percentile(theirs, 0.5):.2f}x",
                )
                row(
                    "/metrics latency p99, 500 jobs",
                    fmt_ms(percentile(ours, 0.99)),
                    f"node-exporter {fmt_ms(percentile(theirs, 0.99))}",
                    f"{percentile(ours, 0.99) / percentile(theirs, 0.99):.2f}x node-exporter (target <= 1x)",
                )
            else:
                row(f"RSS, 1,000 processes, 500 jobs, {gpus}", f"{agent_rss:.1f} MiB", "node-exporter missing", "")

        # 6. Memory across a churn of short-lived processes.
        before, after = churn_memory(workdir, churn_total)
        row(
            f"RSS before/after churn of {churn_total:,} processes",
            f"{before:.1f} -> {after:.1f} MiB",
            "",
            f"growth {after - before:+.1f} MiB (target: about 0)",
        )

    print_table(rows, quick, background)
    return 0


def print_table(rows: list[tuple[str, str, str, str]], quick: bool, background: int) -> None:
    print(
        f"\njouleward benchmark ({'quick' if quick else 'full'}), {os.cpu_count()} CPUs, "
        f"{background} background processes\n"
    )
    widths = [max(len(r[i]) for r in rows + [("what", "jouleward", "reference", "verdict")]) for i in range(4)]
    header = ("what", "jouleward", "reference", "verdict")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


if __name__ == "__main__":
    sys.exit(main())
