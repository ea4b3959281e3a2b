"""A real agent process on fixture sysfs (and optionally procfs) trees that a
test advances, plus the invariants every scrape must satisfy."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support import free_port  # noqa: F401  (re-exported for the fault tests)

ROOT = Path(__file__).resolve().parents[1]
MAX_RANGE_UJ = 262143328850


def write_atomic(path: Path, text: str) -> None:
    """Replace a file the way the kernel would present it: never half written."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Powercap:
    """A RAPL tree with one package zone per socket (and a dram zone)."""

    def __init__(self, sysfs: Path, sockets: int = 1, max_range_uj: int = MAX_RANGE_UJ) -> None:
        self.root = sysfs / "class" / "powercap"
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_range_uj = max_range_uj
        self.raw: dict[str, int] = {}
        for socket_index in range(sockets):
            for zone_id, name in (
                (f"intel-rapl:{socket_index}", f"package-{socket_index}"),
                (f"intel-rapl:{socket_index}:0", "dram"),
            ):
                zone = self.root / zone_id
                zone.mkdir()
                (zone / "name").write_text(name + "\n")
                (zone / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
                self.set(zone_id, 1_000_000)

    def path(self, zone_id: str) -> Path:
        return self.root / zone_id / "energy_uj"

    def set(self, zone_id: str, raw_uj: int) -> None:
        self.raw[zone_id] = raw_uj
        write_atomic(self.path(zone_id), f"{raw_uj}\n")

    def advance(self, zone_id: str, joules: float) -> None:
        self.set(zone_id, (self.raw[zone_id] + int(joules * 1e6)) % (self.max_range_uj + 1))


def unprivileged_uid() -> int | None:
    """A uid to run the agent under so that file modes bind it: ``nobody``
    when the tests run as root (root reads anything), else the tests' own."""
    if os.geteuid() != 0:
        return None
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import agent.cli, fastapi"],
            cwd=ROOT,
            user=65534,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            timeout=60,
        )
    except OSError:
        return -1
    return 65534 if probe.returncode == 0 else -1


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_exposition(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def check_values(samples: Samples) -> None:
    """Nothing negative, NaN or infinite, anywhere (+Inf bucket bounds are labels, not values)."""
    bad = {key: value for key, value in samples.items() if not math.isfinite(value) or value < 0}
    assert not bad, f"negative or non-finite samples: {bad}"


def is_counter_sample(name: str) -> bool:
    return name.endswith(("_total", "_bucket", "_count", "_sum"))


def check_monotonic(before: Samples, after: Samples) -> None:
    """Every counter series present in both scrapes did not go backwards."""
    backwards = {
        key: (before[key], value)
        for key, value in after.items()
        if is_counter_sample(key[0]) and key in before and value < before[key] - 1e-9
    }
    assert not backwards, f"counters went backwards: {backwards}"


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total, found = 0.0, False
    for (sample_name, sample_labels), sample_value in samples.items():
        if sample_name == name and all(item in sample_labels for item in labels.items()):
            total += sample_value
            found = True
    if not found:
        raise KeyError(f"{name}{labels} not exported")
    return total


class AgentProcess:
    """``jouleward run`` as a subprocess on loopback, with a log file."""

    def __init__(
        self,
        workdir: Path,
        sysfs: Path,
        procfs: Path | None = None,
        interval_s: float = 0.2,
        flush_interval_s: float = 0.5,
        env: dict[str, str] | None = None,
        user: int | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.socket = workdir / "control.sock"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"agent-{self.port}.log"
        argv = [
            sys.executable,
            "-m",
            "agent.cli",
            "run",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--state-dir",
            str(self.state_dir),
            "--control-socket",
            str(self.socket),
            "--sysfs",
            str(sysfs),
            "--interval",
            str(interval_s),
            "--log-level",
            "info",
            *extra_args,
        ]
        if procfs is not None:
            argv += ["--procfs", str(procfs)]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("JOULEWARD_")}
        full_env["JOULEWARD_FLUSH_INTERVAL_S"] = str(flush_interval_s)
        full_env["PYTHONPATH"] = str(ROOT)
        full_env.update(env or {})
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            argv, cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, user=user
        )
        self.last: Samples = {}

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"agent exited with {self.process.returncode}:\n{self.log}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"agent not ready within {timeout_s} s:\n{self.log}")

    def ticks(self) -> int:
        return httpx.get(self.url + "/healthz", timeout=10.0).json()["ticks"]

    def wait_ticks(self, count: int, timeout_s: float = 60.0) -> None:
        target = self.ticks() + count
        deadline = time.monotonic() + timeout_s
        while self.ticks() < target:
            assert time.monotonic() < deadline, f"agent did not tick {count} times in {timeout_s} s"
            time.sleep(0.05)

    def scrape(self) -> Samples:
        """A scrape that must satisfy the invariants against the previous one."""
        response = httpx.get(self.url + "/metrics", timeout=10.0)
        assert response.status_code == 200, response.text
        samples = parse_exposition(response.text)
        check_values(samples)
        check_monotonic(self.last, samples)
        self.last = samples
        return samples

    def settle(self, ticks: int = 3) -> Samples:
        self.wait_ticks(ticks)
        return self.scrape()

    def control(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://agent", timeout=10.0)

    def terminate(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._log.close()


CLK_TCK = os.sysconf("SC_CLK_TCK")


def boot_ticks() -> int:
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * CLK_TCK)


class FakeProcfs:
    """A procfs tree whose processes, CPU times and start times the test writes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "sys/kernel/random").mkdir(parents=True, exist_ok=True)
        (root / "sys/kernel/random/boot_id").write_text(Path("/proc/sys/kernel/random/boot_id").read_text())
        (root / "cpuinfo").write_text("processor\t: 0\nmodel name\t: Fixture CPU\n")
        (root / "meminfo").write_text("MemTotal:       16384000 kB\n")
        self.busy = self.idle = 0
        self.write_node()

    def write_node(self) -> None:
        write_atomic(self.root / "stat", f"cpu  {self.busy} 0 0 {self.idle} 0 0 0 0 0 0\n")

    def advance_node(self, busy_ticks: int, idle_ticks: int) -> None:
        self.busy += busy_ticks
        self.idle += idle_ticks
        self.write_node()

    def add(
        self,
        pid: int,
        start_ticks: int,
        cpu_ticks: int = 0,
        env: dict[str, str] | None = None,
        comm: str = "worker",
        ppid: int = 1,
    ) -> None:
        directory = self.root / str(pid)
        directory.mkdir(exist_ok=True)
        (directory / "cgroup").write_text("0::/\n")
        uid = os.getuid()
        (directory / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
        (directory / "cmdline").write_bytes(comm.encode() + b"\0")
        (directory / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in (env or {}).items()))
        self.set_cpu(pid, start_ticks, cpu_ticks, comm, ppid)

    def set_cpu(self, pid: int, start_ticks: int, cpu_ticks: int, comm: str = "worker", ppid: int = 1) -> None:
        fields = ["S", str(ppid)] + ["0"] * 9 + [str(cpu_ticks), "0"] + ["0"] * 6 + [str(start_ticks), "0", "100"]
        fields += ["0"] * 30
        write_atomic(self.root / str(pid) / "stat", f"{pid} ({comm}) {' '.join(fields)}\n")

    def remove(self, pid: int) -> None:
        directory = self.root / str(pid)
        for child in directory.iterdir():
            child.unlink()
        directory.rmdir()


def conservation_gap_j(samples: Samples, domain: str) -> float:
    """|node - (idle + unattributed + jobs)| for one attributed domain."""

    def total(name: str) -> float:
        try:
            return value(samples, name, domain=domain)
        except KeyError:
            return 0.0

    node = total("jouleward_node_energy_joules_total")
    parts = (
        total("jouleward_idle_energy_joules_total")
        + total("jouleward_unattributed_energy_joules_total")
        + total("jouleward_job_energy_joules_total")
    )
    return abs(node - parts)


def as_local_peer(app):
    """The control app as the Unix socket serves it to this process: the
    socket's protocol puts the peer's credentials into every request's state;
    in process, this wrapper does the same for the test's own uid and pid."""
    from agent.api.access import Caller
    from agent.api.peercred import STATE_KEY

    caller = Caller(uid=os.getuid(), pid=os.getpid(), via="unix")

    async def with_peer(scope, receive, send):
        if scope["type"] == "http":
            scope = {**scope, "state": {**scope.get("state", {}), STATE_KEY: caller}}
        await app(scope, receive, send)

    return with_peer
